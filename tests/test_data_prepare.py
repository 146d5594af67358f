"""`prepare` turns every source into readable WebDataset shards with an honest manifest, and caches by config."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from data_helpers import WORDS, make_cfg, make_docs

from data.config import CleanConfig
from data.prepared import open_split, open_tokenizer, prepare_training_data, read_meta, verify


def all_tokens(prepared, split="train") -> np.ndarray:
    store = open_split(prepared, split)
    return np.concatenate([store[i]["input_ids"] for i in range(len(store))]) if len(store) else np.empty(0)


def decoded_text(prepared) -> str:
    tok = open_tokenizer(prepared)
    return tok.decode(np.concatenate([all_tokens(prepared, "train"), all_tokens(prepared, "val")]).tolist())


def write_tar(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_text_files_become_webdataset_shards_any_reader_can_open(tmp_path):
    docs = make_docs(40)
    for i in range(4):
        (tmp_path / f"part{i}.txt").write_text("\n\n".join(docs[i * 10:(i + 1) * 10]))
    cfg = make_cfg("text", [tmp_path / "*.txt"], text_unit="paragraph", shard_mb=0.01)
    out = prepare_training_data(cfg, tmp_path / "root", seed=0)
    meta = read_meta(out)
    assert meta["counts"]["documents_read"] == 40 and meta["counts"]["documents_kept"] == 40
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 40
    assert meta["splits"]["val"]["documents"] == 8  # exactly val_fraction of documents
    shards = meta["splits"]["train"]["shards"]
    assert len(shards) > 1 and all(len(s["sha256"]) == 64 for s in shards)
    assert meta["tokenizer_sha256"] and meta["config"]["source"] == "text" and verify(out) == []
    # The shards are plain WebDataset: the webdataset library reads the same blocks the store serves.
    import webdataset as wds

    urls = [str(out / s["name"]) for s in shards]
    blocks = [s["input_ids.npy"] for s in wds.WebDataset(urls, shardshuffle=False).decode()]
    store = open_split(out, "train")
    assert len(blocks) == len(store) == meta["splits"]["train"]["blocks"]
    assert all(np.array_equal(b, store[i]["input_ids"]) for i, b in enumerate(blocks))
    # Every kept word survives tokenization and packing (only the ragged tail of a split is cut).
    text = decoded_text(out)
    assert sum(d.split(": ", 1)[1][:20] in text for d in docs) >= 38


@pytest.mark.parametrize("source", ["jsonl", "csv", "parquet", "hf_disk"])
def test_record_sources_read_the_configured_field(tmp_path, source):
    import datasets

    docs = make_docs(30)
    records = [{"id": i, "body": d, "title": f"title{i}"} for i, d in enumerate(docs)]
    ds = datasets.Dataset.from_list(records)
    path = tmp_path / f"corpus.{source}"
    if source == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif source == "csv":
        ds.to_csv(str(path), index=False)
    elif source == "parquet":
        ds.to_parquet(str(path))
    else:
        ds.save_to_disk(str(path))
    out = prepare_training_data(make_cfg(source, [path], text_field="body"), tmp_path / "root", seed=0)
    assert read_meta(out)["counts"]["documents_kept"] == 30
    assert docs[3].split(": ", 1)[1][:30] in decoded_text(out)
    joined = prepare_training_data(make_cfg(source, [path], columns=["title", "body"]), tmp_path / "r2", seed=0)
    assert "title7\n\n" + docs[7][:20] in decoded_text(joined)


def test_webdataset_source_reads_local_and_pipe_urls(tmp_path):
    docs = make_docs(24)
    for s in range(2):
        write_tar(tmp_path / f"in-{s}.tar", {f"s{i:03d}": {"txt": docs[i].encode(), "json": b"{}"}
                                            for i in range(s * 12, (s + 1) * 12)})
    local = prepare_training_data(make_cfg("webdataset", [tmp_path / "in-*.tar"], text_field="txt"), tmp_path / "a", 0)
    pipe = make_cfg("webdataset", [f"pipe:cat {tmp_path}/in-{{0..1}}.tar"], text_field="txt")
    piped = prepare_training_data(pipe, tmp_path / "b", 0)
    assert read_meta(local)["counts"]["documents_kept"] == 24
    assert np.array_equal(all_tokens(local), all_tokens(piped))


def test_token_files_with_sidecar_or_llmc_header(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 1000, 32 * 50, dtype=np.uint16)
    tokens.tofile(tmp_path / "a.bin")
    (tmp_path / "a.bin.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 1000}))
    header = np.zeros(256, dtype=np.int32)
    header[:3] = [20240520, 1, len(tokens)]
    (tmp_path / "b.bin").write_bytes(header.tobytes() + tokens.tobytes())
    for name in ("a.bin", "b.bin"):
        out = prepare_training_data(make_cfg("tokens", [tmp_path / name]), tmp_path / f"root-{name}", 0)
        meta = read_meta(out)
        assert meta["splits"]["train"]["blocks"] + meta["splits"]["val"]["blocks"] == 50
        assert meta["splits"]["val"]["blocks"] == 10
        got = np.concatenate([all_tokens(out, "train"), all_tokens(out, "val")])
        assert sorted(got.tolist()) == sorted(tokens.tolist())
    assert read_meta(out)["vocab_size"] == 50257  # from the llm.c GPT-2 magic


def test_cleaning_strips_html_normalizes_and_counts_every_drop(tmp_path):
    base = make_docs(12)
    near = base[0].replace("doc 0:", "doc 0 (copy):")  # same words, one changed token
    rows = base + [base[2], "  ", "tiny", near, "<p>caf\u0065\u0301 &amp; <b>bar</b></p><script>x()</script>" * 20]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    clean = CleanConfig(strip_html=True, min_chars=10, near_dedup=True)
    out = prepare_training_data(make_cfg("jsonl", [tmp_path / "c.jsonl"], clean=clean), tmp_path / "root", 0)
    counts = read_meta(out)["counts"]
    assert counts["documents_read"] == len(rows)
    assert (counts["dropped_duplicate"], counts["dropped_empty"], counts["dropped_too_short"],
            counts["dropped_near_duplicate"]) == (1, 1, 1, 1)
    assert counts["documents_kept"] == 13
    text = decoded_text(out)
    assert "caf\u00e9 & bar" in text and "<b>" not in text and "x()" not in text


def test_unpacked_keeps_documents_apart_and_splits_long_ones(tmp_path):
    docs = make_docs(10, words=8) + [make_docs(1, seed=9, words=400)[0]]  # the last is ~10x seq_len
    (tmp_path / "u.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    out = prepare_training_data(make_cfg("jsonl", [tmp_path / "u.jsonl"], packed=False), tmp_path / "root", 0)
    meta, tok = read_meta(out), open_tokenizer(tmp_path / "root" / "data" / out.name)
    samples = [s for split in ("train", "val") for s in (lambda st: [st[i]["input_ids"] for i in range(len(st))])(
        open_split(out, split))]
    assert all(0 < len(s) <= 32 for s in samples), "samples come at their real length, never padded"
    eos, pad = meta["eos_id"], meta["pad_id"]
    assert sum(int((s == eos).sum()) for s in samples) == 11, "one separator per document"
    assert not any((s == pad).any() for s in samples)
    long_doc = tok.encode(docs[-1], add_special_tokens=False)
    assert len(long_doc) > 5 * 32 and len(samples) >= 10 + len(long_doc) // 32
    assert all(s[-1] == eos or len(s) == 32 for s in samples), "a short sample is the end of a document"


def test_same_config_reuses_and_changes_rebuild(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_docs(20)))
    cfg = make_cfg("jsonl", [path])
    first = prepare_training_data(cfg, tmp_path / "root", 0)
    stamp = (first / "manifest.json").stat().st_mtime_ns
    assert prepare_training_data(make_cfg("jsonl", [path]), tmp_path / "root", 0) == first
    assert (first / "manifest.json").stat().st_mtime_ns == stamp, "a cached prepare must not rebuild"
    assert prepare_training_data(make_cfg("jsonl", [path], seq_len=16), tmp_path / "root", 0) != first
    assert prepare_training_data(cfg, tmp_path / "root", 1) != first
    path.write_text(path.read_text() + json.dumps({"text": "one more document here"}) + "\n")
    assert prepare_training_data(cfg, tmp_path / "root", 0) != first, "an edited input must rebuild"
    custom = make_cfg("jsonl", [path], prepared_dir=str(tmp_path / "elsewhere"))
    assert prepare_training_data(custom, tmp_path / "root", 0).parent == tmp_path / "elsewhere"


def test_cached_embedded_prepare_is_fast(tmp_path):
    import time

    from orchestrator.config import load_config

    cfg = load_config(["experiment=smoke"])
    prepare_training_data(cfg.data, tmp_path, cfg.seed)
    started = time.perf_counter()
    prepare_training_data(cfg.data, tmp_path, cfg.seed)
    assert time.perf_counter() - started < 0.5


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_data_engine_matches_local_engine(tmp_path, ray_cluster):
    import ray.data

    import data.pipeline

    context = ray.data.DataContext.get_current()
    settings = (context.execution_options.preserve_order, context.op_resource_reservation_enabled)
    docs = make_docs(400, words=200)
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    original = data.pipeline.CHUNK_CHARS
    data.pipeline.CHUNK_CHARS = 40_000  # several blocks, so map_batches runs as several tasks
    try:
        local = prepare_training_data(make_cfg("jsonl", [tmp_path / "r.jsonl"]), tmp_path / "a", 0, engine="local")
        ray_out = prepare_training_data(make_cfg("jsonl", [tmp_path / "r.jsonl"]), tmp_path / "b", 0, engine="ray")
    finally:
        data.pipeline.CHUNK_CHARS = original
    assert read_meta(ray_out)["engine"] == "ray"
    assert read_meta(local)["splits"] == read_meta(ray_out)["splits"], "same shards, same checksums"
    assert (context.execution_options.preserve_order, context.op_resource_reservation_enabled) == settings, \
        "the driver's own Ray Data settings are left as they were"


def test_given_tokenizer_is_applied_while_reading_with_identical_output(tmp_path, ray_cluster, monkeypatch):
    import data.pipeline

    docs = make_docs(400, words=200)
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    monkeypatch.setattr(data.pipeline, "CHUNK_CHARS", 40_000)  # ~12 chunks of the ~500 KB corpus
    monkeypatch.setattr(data.pipeline, "LOCAL_AHEAD", 2)  # more chunks than slots: some wait for a free one
    trained = prepare_training_data(make_cfg("jsonl", [tmp_path / "r.jsonl"]), tmp_path / "t", 0, engine="local")
    given = make_cfg("jsonl", [tmp_path / "r.jsonl"])
    given.tokenizer.kind, given.tokenizer.path = "pretrained", str(trained / "tokenizer")
    local = prepare_training_data(given, tmp_path / "a", 0, engine="local")
    ray_out = prepare_training_data(given, tmp_path / "b", 0, engine="ray")
    assert read_meta(local)["splits"] == read_meta(trained)["splits"] == read_meta(ray_out)["splits"]
    assert read_meta(local)["counts"] == read_meta(trained)["counts"]


def test_cli_prepare_reports_and_reuses(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_docs(20)))
    args = [sys.executable, "-m", "orchestrator.cli", "data", "prepare", "data=jsonl", f"data.paths=[{path}]",
            "data.engine=local", "experiment=smoke", f"paths.root={tmp_path}/root"]
    cwd = Path(__file__).resolve().parent.parent
    first = subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "train:" in first.stdout and "dropped/skipped" in first.stdout
    again = subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=120)
    assert again.stdout.startswith("reused ")


def test_auto_engine_uses_ray_data_only_when_a_cluster_is_given(tmp_path, monkeypatch):
    import ray

    from data.prepared import choose_engine

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # other tests in this module start a cluster
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    jsonl = make_cfg("jsonl", [tmp_path / "r.jsonl"])
    assert choose_engine(jsonl) == "local"  # a laptop: no cluster to start just for tokenizing
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert choose_engine(jsonl) == "ray"
    jsonl.engine = "local"
    assert choose_engine(jsonl) == "local", "an explicit engine wins"
    assert choose_engine(make_cfg("embedded", [])) == "local", "the small embedded corpus stays in-process"


def cli_prepare(tmp_path: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    for i in range(12):
        (tmp_path / f"d{i}.txt").write_text(" ".join(make_docs(1, seed=i, words=40)))
    args = [sys.executable, "-m", "orchestrator.cli", "data", "prepare", "data=text",
            f"data.paths=[{tmp_path}/*.txt]", "experiment=smoke", "data.seq_len=16", f"paths.root={tmp_path}/root",
            *overrides]
    clean_env = {k: v for k, v in (env or os.environ).items() if k != "RAY_ADDRESS"}
    return subprocess.run(args, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
                          timeout=300, env=clean_env)


def test_cli_prepare_with_auto_engine_and_no_cluster_stays_local(tmp_path):
    done = cli_prepare(tmp_path, "data.engine=auto")
    assert done.returncode == 0, done.stderr
    assert "engine=local" in done.stdout, "the README: Ray Data only when a cluster is given"


@pytest.mark.slow
def test_cli_prepare_on_ray_prints_no_ray_log_lines(tmp_path):
    import re

    done = cli_prepare(tmp_path, "data.engine=ray")
    assert done.returncode == 0, done.stderr
    assert "engine=ray" in done.stdout
    noise = [line for line in done.stderr.splitlines() if re.search(r"\b(INFO|WARNING)\b", line)]
    assert noise == [], "Ray's log lines need --verbose"


def test_secrets_stay_out_of_the_ray_runtime_env():
    from data.pipeline import forwarded_env

    environ = {"HF_TOKEN": "hf_x", "RAY_AUTH_TOKEN": "r", "HF_HOME": "/hf", "RAY_DEDUP_LOGS": "1",
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_TOKEN": "t", "RAY_REDIS_PASSWORD": "p",
               "AWS_SECRET_ACCESS_KEY": "s", "PATH": "/bin"}
    env = forwarded_env(environ, {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"})
    assert env == {"HF_HOME": "/hf", "RAY_DEDUP_LOGS": "1", "TOKENIZERS_PARALLELISM": "false",
                   "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    asked = forwarded_env(environ | {"LMFORGE_FORWARD_ENV": " HF_TOKEN, AWS_SECRET_ACCESS_KEY,NOT_SET"})
    assert asked["HF_TOKEN"] == "hf_x" and asked["AWS_SECRET_ACCESS_KEY"] == "s"
    assert "RAY_AUTH_TOKEN" not in asked and "NOT_SET" not in asked


def test_start_ray_sends_only_forwarded_env(monkeypatch):
    import ray

    import data.pipeline

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "ray_secret")
    monkeypatch.delenv("LMFORGE_FORWARD_ENV", raising=False)
    assert data.pipeline.start_ray({"PYTHONWARNINGS": "ignore"})
    env = seen["runtime_env"]["env_vars"]
    assert "HF_TOKEN" not in env and "RAY_AUTH_TOKEN" not in env and env["PYTHONWARNINGS"] == "ignore"
    assert "hf_secret" not in repr(seen) and "ray_secret" not in repr(seen)


def test_sentence_pairs_are_stored_one_webdataset_member_per_field(tmp_path):
    """An objective's samples are records: NSP pairs hold input_ids, token_type_ids and next_sentence_label,
    each its own `<key>.<field>.npy` member that any WebDataset reader sees, and the store serves the same."""
    import json as _json
    import random

    import webdataset as wds

    from data.config import TokenizerConfig
    from model.objectives.config import ObjectiveConfig
    from model.objectives.mlm_nsp import MaskedLMWithNSP

    rng = random.Random(0)
    docs = [" ".join(f"Sentence {j} of document {i} says {' '.join(rng.sample(WORDS, 6))}." for j in range(8))
            for i in range(30)]
    (tmp_path / "d.jsonl").write_text("".join(_json.dumps({"text": d}) + "\n" for d in docs))
    cfg = make_cfg("jsonl", [tmp_path / "d.jsonl"], tokenizer=TokenizerConfig(kind="wordpiece", vocab_size=300,
                                                                             min_frequency=1))
    spec = MaskedLMWithNSP.sample_spec(ObjectiveConfig(name="mlm_nsp"))
    out = prepare_training_data(cfg, tmp_path / "root", 0, spec=spec)
    assert out != prepare_training_data(cfg, tmp_path / "root", 0), "pairs and blocks are different corpora"
    meta = read_meta(out)
    assert meta["fields"] == {"input_ids": "uint16", "token_type_ids": "uint8", "next_sentence_label": "uint8"}
    urls = [str(out / s["name"]) for s in meta["splits"]["train"]["shards"]]
    records = list(wds.WebDataset(urls, shardshuffle=False).decode())
    store = open_split(out, "train")
    assert len(records) == len(store) > 50
    tokenizer = open_tokenizer(out)
    for i, record in enumerate(records):
        sample = store[i]
        for field in meta["fields"]:
            assert np.array_equal(record[f"{field}.npy"], sample[field])
        ids, types = sample["input_ids"], sample["token_type_ids"]
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id and len(ids) <= 32
        first_sep = int(np.flatnonzero(ids == tokenizer.sep_token_id)[0])
        assert not types[:first_sep + 1].any() and types[first_sep + 1:].all()
    assert {int(store[i]["next_sentence_label"][0]) for i in range(len(store))} == {0, 1}
