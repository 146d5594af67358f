"""Every kind of bad input gets a clear error naming where it is, or a counted skip with data.lenient=true."""

import io
import json
import tarfile
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from data_helpers import make_cfg, make_docs

from common.errors import LmforgeError
from data.prepared import open_split, prepare_training_data, read_meta
from data.sources import iter_documents


def jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def good_lines(n=20) -> list[str]:
    return [json.dumps({"text": t}) for t in make_docs(n)]


def prepare(cfg, tmp_path):
    return prepare_training_data(cfg, tmp_path / "root", seed=0)


@pytest.mark.parametrize("source", ["text", "jsonl", "csv", "webdataset"])
def test_empty_file_is_named(tmp_path, source):
    empty = tmp_path / f"empty.{source}"
    empty.write_bytes(b"")
    with pytest.raises(LmforgeError, match=f"{empty}.*empty"):
        prepare(make_cfg(source, [empty]), tmp_path)


def test_empty_file_lenient_is_counted(tmp_path):
    jsonl(tmp_path / "a.jsonl", good_lines())
    (tmp_path / "b.jsonl").write_bytes(b"")
    out = prepare(make_cfg("jsonl", [tmp_path / "*.jsonl"], lenient=True), tmp_path)
    assert read_meta(out)["counts"]["empty_files"] == 1


def test_invalid_utf8_names_file_and_byte_offset(tmp_path):
    good = "\n\n".join(make_docs(20)).encode()
    bad = tmp_path / "bad.txt"
    # Put the bad byte past the first read chunk boundary, right after a split multi-byte character.
    prefix = good + b"\n\n" + b"filler words " * 90_000 + "é".encode()
    bad.write_bytes(prefix + b"\xff tail")
    with pytest.raises(LmforgeError, match=f"{bad}: invalid UTF-8 at byte offset {len(prefix)}"):
        prepare(make_cfg("text", [bad], text_unit="paragraph"), tmp_path)
    out = prepare(make_cfg("text", [bad], text_unit="paragraph", lenient=True), tmp_path)
    assert read_meta(out)["counts"]["utf8_bytes_replaced"] == 1


def test_invalid_utf8_in_jsonl_is_located(tmp_path):
    lines = [line.encode() for line in good_lines()]
    lines[4] = b'{"text": "caf\xe9"}'
    path = tmp_path / "b.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    offset = sum(len(line) + 1 for line in lines[:4]) + len(b'{"text": "caf')
    with pytest.raises(LmforgeError, match=f"byte offset {offset}"):
        prepare(make_cfg("jsonl", [path]), tmp_path)


def test_malformed_jsonl_line_is_numbered(tmp_path):
    lines = good_lines()
    lines[6] = '{"text": "unterminated'
    path = jsonl(tmp_path / "m.jsonl", lines)
    with pytest.raises(LmforgeError, match=f"{path}:7: malformed JSON line"):
        prepare(make_cfg("jsonl", [path]), tmp_path)
    lines[9] = "[1, 2]"
    out = prepare(make_cfg("jsonl", [jsonl(path, lines)], lenient=True), tmp_path)
    assert read_meta(out)["counts"]["malformed_json"] == 2
    assert read_meta(out)["counts"]["documents_kept"] == 18


def test_missing_text_field_lists_fields(tmp_path):
    path = jsonl(tmp_path / "f.jsonl", [json.dumps({"body": t, "id": 1}) for t in make_docs(5)])
    with pytest.raises(LmforgeError, match=r"f.jsonl:1: no field 'text'; fields present: body, id"):
        prepare(make_cfg("jsonl", [path]), tmp_path)
    csv = tmp_path / "f.csv"
    csv.write_text("body,id\n" + "".join(f"{t},{i}\n" for i, t in enumerate(make_docs(5))))
    with pytest.raises(LmforgeError, match=r"no field 'content'; fields present: body, id"):
        prepare(make_cfg("csv", [csv], text_field="content"), tmp_path)


def write_shard(path: Path, docs: list[str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, doc in enumerate(docs):
            data = doc.encode()
            info = tarfile.TarInfo(f"{i:05d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_tar_shard_is_named_or_skipped_and_counted(tmp_path, damage):
    docs = make_docs(30)
    write_shard(tmp_path / "s-0.tar", docs[:15])
    raw = write_shard(tmp_path / "s-1.tar", docs[15:])
    bad = tmp_path / "s-1.tar"
    bad.write_bytes(raw[: len(raw) // 2 + 100] if damage == "truncated" else b"\x00\x01junk" * 300)
    with pytest.raises(LmforgeError, match=f"webdataset shard {bad} is truncated or corrupt"):
        prepare(make_cfg("webdataset", [tmp_path / "s-*.tar"], text_field="txt"), tmp_path)
    out = prepare(make_cfg("webdataset", [tmp_path / "s-*.tar"], text_field="txt", lenient=True), tmp_path)
    counts = read_meta(out)["counts"]
    assert counts["corrupt_shards"] == 1 and counts["documents_kept"] >= 15


def test_truncated_prepared_shard_is_named(tmp_path):
    out = prepare(make_cfg("jsonl", [jsonl(tmp_path / "a.jsonl", good_lines())]), tmp_path)
    shard = out / read_meta(out)["splits"]["train"]["shards"][0]["name"]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(LmforgeError, match=f"prepared shard {shard} is truncated"):
        open_split(out, "train")


def test_enormous_single_line_is_read_in_bounded_memory(tmp_path):
    words = " ".join(make_docs(1, words=2000)[0].split()[2:]) + " "
    path = tmp_path / "huge.txt"
    with open(path, "w") as f:
        for _ in range(64 * 1024 * 1024 // len(words)):  # one 64 MB line, no newline anywhere
            f.write(words)
    size = path.stat().st_size
    cfg = make_cfg("text", [path], text_unit="line", max_doc_chars=1 << 20)
    tracemalloc.start()
    pieces = total = 0
    for text, _cont in iter_documents(cfg, Counter()):
        pieces, total = pieces + 1, total + len(text)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert total == size and pieces >= 64
    assert peak < 16 * (1 << 20), f"peak {peak / 2**20:.0f} MB while reading a {size / 2**20:.0f} MB line"


def test_long_document_pieces_are_joined_without_separators(tmp_path):
    words = " ".join(make_docs(1, words=3000)[0].split()[2:])  # ~20 KB, one line
    path = tmp_path / "long.txt"
    path.write_text((words + "\n") * 2 + "\n".join(make_docs(10)))
    out = prepare(make_cfg("text", [path], text_unit="line", max_doc_chars=2048), tmp_path)
    meta = read_meta(out)
    assert meta["counts"]["documents_read"] == 12  # the long lines count once each, not per piece
    stores = [open_split(out, s) for s in ("train", "val")]
    tokens = np.concatenate([st[i]["input_ids"] for st in stores for i in range(len(st))])
    separators = int((tokens == meta["eos_id"]).sum())
    assert separators <= 11 - meta["counts"].get("dropped_duplicate", 0), "pieces were split by separators"


def test_token_file_errors_name_the_file(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(100, dtype=np.uint16).tofile(path)
    with pytest.raises(LmforgeError, match="t.bin: no t.bin.json sidecar and no llm.c header"):
        prepare(make_cfg("tokens", [path]), tmp_path)
    with pytest.raises(LmforgeError, match="token 99 at position 50 is outside the vocabulary of 50"):
        prepare(make_cfg("tokens", [path], token_dtype="uint16", token_vocab_size=50), tmp_path)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(LmforgeError, match="not a whole number of uint16 tokens"):
        prepare(make_cfg("tokens", [path], token_dtype="uint16", token_vocab_size=500), tmp_path)


def test_bad_data_config_fails_at_compose_naming_the_key():
    from common.errors import ConfigError
    from orchestrator.config import load_config

    for override, key in [("data.engine=spark", "data.engine"), ("data.clean.min_chars=0", "data.clean.min_chars"),
                          ("data.text_unit=sentence", "data.text_unit"), ("data.shard_mb=0", "data.shard_mb")]:
        with pytest.raises(ConfigError, match=key):
            load_config([override])
