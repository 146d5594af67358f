"""Driver-side preparation of training data, cached by config hash, and worker-side opening of splits.

A prepared directory holds `tokenizer/`, WebDataset shards per split (`train-000000.tar`, with a
`.idx.npy` offset index beside each) and `manifest.json`. The driver builds it once, keyed by the data
config, the seed and the inputs' sizes and mtimes; every worker memory-maps the shards.
"""

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from common.errors import LmforgeError
from common.processes import pid_alive
from data.config import DataConfig
from data.samples import CAUSAL_BLOCKS, SampleSpec
from data.shards import ShardStore, verify_shards
from data.sources import expand_paths, is_remote

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
SMALL_SOURCES = ("embedded",)  # tokenized in-process under engine=auto unless a Ray cluster is up


def input_fingerprint(cfg: DataConfig) -> list:
    """Path, size and mtime of each local input, so an edited file rebuilds; remote inputs by URL only."""
    if cfg.source in ("embedded", "builtin"):  # both ship with lmforge (or a package): no files of the user's
        return []
    prints = []
    for path in expand_paths(list(cfg.paths) + list(cfg.val_paths), cfg.source):
        if is_remote(path):
            prints.append([path])
        else:
            stat = os.stat(path)
            prints.append([os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
    return prints


def data_key(cfg: DataConfig, seed: int, spec: SampleSpec = CAUSAL_BLOCKS, task: dict | None = None) -> str:
    config = asdict(cfg)
    config.pop("engine")  # every engine writes identical output
    config.pop("prepared_dir")
    key = {"data": config, "seed": seed, "format": FORMAT_VERSION, "inputs": input_fingerprint(cfg)}
    if spec.key() is not None:  # causal-LM blocks keep the key they had before objectives chose samples
        key["samples"] = spec.key()
    if task is not None:  # a fine-tuning task: its name and the settings its sample builder reads
        key["task"] = task
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepared_path(cfg: DataConfig, root: str | Path, seed: int, spec: SampleSpec | None = CAUSAL_BLOCKS,
                  task: dict | None = None) -> Path:
    base = Path(cfg.prepared_dir).expanduser() if cfg.prepared_dir else Path(root) / "data"
    return base / f"{cfg.name}-{data_key(cfg, seed, spec or CAUSAL_BLOCKS, task)}"


def choose_engine(cfg: DataConfig) -> str:
    if cfg.engine != "auto":
        return cfg.engine
    import sys

    # A cluster the user points at (RAY_ADDRESS) or one this process already joined gets the work;
    # starting a cluster just to tokenize on one machine costs more than it gains.
    # Ray may be half imported here: the launcher imports Ray Train in a thread while data is prepared.
    ray_up = bool(getattr(sys.modules.get("ray"), "is_initialized", lambda: False)())
    cluster = ray_up or bool(os.environ.get("RAY_ADDRESS"))
    return "ray" if cluster and cfg.source not in SMALL_SOURCES else "local"


def prepare_training_data(cfg: DataConfig, root: str | Path, seed: int, engine: str | None = None,
                          progress: bool = False, worker_env: dict[str, str] | None = None,
                          spec: SampleSpec | None = CAUSAL_BLOCKS, task=None, task_cfg=None) -> Path:
    """Return the prepared directory for `cfg`, building it if this exact config and input were never prepared.

    `engine` overrides `cfg.engine` (ray: Ray Data map_batches; local: this process). `worker_env` goes to
    the Ray Data job's workers when preparing starts Ray itself. `spec`: the samples the objective trains on.
    `task` (a fine-tuning task class) and `task_cfg` (its objective config): build the task's samples from
    labelled records instead (data.finetune), in this process.
    """
    out = prepared_path(cfg, root, seed, spec, task_key(task, task_cfg))
    if (out / MANIFEST).is_file():
        return out
    from data.pipeline import build

    remove_abandoned(out.parent)
    engine = engine or ("local" if task is not None else choose_engine(cfg))
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if task is not None:
            from data.finetune import build_task_data

            manifest = build_task_data(cfg, tmp, seed, task, task_cfg, progress)
        else:
            manifest = build(cfg, tmp, seed, engine, progress, worker_env, spec or CAUSAL_BLOCKS)
        manifest = {"format": FORMAT_VERSION, "name": cfg.name, "source": cfg.source, "seq_len": cfg.seq_len,
                    "packed": cfg.packed, "dtype": shard_dtype(manifest["vocab_size"]), "seed": seed,
                    "key": out.name, **manifest, "inputs": input_fingerprint(cfg), "config": asdict(cfg)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Rename is atomic, so a crash or a concurrent prepare never leaves a half-written directory in use.
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


TASK_FORMAT = 1  # bump when a task's samples change for the same records and settings


def task_key(task, task_cfg) -> dict | None:
    """What of a fine-tuning task goes into the prepared data's key: its name, the settings its builder reads
    (all of the objective config, to be safe) and the task format."""
    if task is None:
        return None
    return {"name": task.name, "objective": asdict(task_cfg), "format": TASK_FORMAT}


def remove_abandoned(base: Path) -> list[Path]:
    """Remove `<name>.tmp-<pid>` directories whose preparing process is gone (killed mid-prepare): each can
    hold a corpus-sized copy. A live process's directory is left alone."""
    removed = []
    for path in base.glob("*.tmp-*") if base.is_dir() else []:
        pid = path.name.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def shard_dtype(vocab_size: int) -> str:
    from data.packing import token_dtype

    return token_dtype(vocab_size).name


def read_meta(prepared: str | Path) -> dict:
    """The manifest: seq_len, vocab_size, splits (documents, blocks, tokens, shards), counts, config."""
    path = Path(prepared) / MANIFEST
    if not path.is_file():
        raise LmforgeError(f"{prepared} is not a prepared corpus (no {MANIFEST}); run `lmforge data prepare`")
    return json.loads(path.read_text())


def open_split(prepared: str | Path, split: str) -> ShardStore:
    """Random access to the samples (at most seq_len tokens each) of `split` (train or val)."""
    meta = read_meta(prepared)
    if split not in meta["splits"]:
        raise LmforgeError(f"no split '{split}' in {prepared}; it has {', '.join(meta['splits'])}")
    # Manifests written before samples had named fields hold token blocks only.
    return ShardStore(prepared, meta["splits"][split]["shards"], meta.get("fields", {"input_ids": meta["dtype"]}))


def verify(prepared: str | Path) -> list[str]:
    """Shards whose checksum no longer matches the manifest."""
    meta = read_meta(prepared)
    return [bad for s in meta["splits"].values() for bad in verify_shards(prepared, s["shards"])]


def open_tokenizer(prepared: str | Path):
    """The prepared data's tokenizer, or None: token files need none unless the user gave one to decode with."""
    path = Path(prepared) / "tokenizer"
    if not path.is_dir():
        return None
    # Imported here: transformers costs the driver half a second it does not need when data is prepared.
    from data.tokenizer import load_tokenizer

    return load_tokenizer(path)


@dataclass(frozen=True)
class Vocabulary:
    """What a model and an objective need to know of the data's ids; any special id may be None (a bare
    token file, or a tokenizer without that token)."""

    size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    mask_id: int | None = None
    cls_id: int | None = None
    sep_id: int | None = None
    unk_id: int | None = None
    special_ids: tuple[int, ...] = ()  # every special token: never masked, noised or predicted as text
    sentinel_ids: tuple[int, ...] = ()  # <extra_id_0>, <extra_id_1>, ...: span corruption's placeholders
    labels: tuple[str, ...] = ()  # a labelled fine-tuning task's label names, in id order


def read_vocabulary(prepared: str | Path) -> Vocabulary:
    meta = read_meta(prepared)
    special = meta.get("special", {})
    # Manifests written before bos_id was recorded came from tokenizers whose bos is their eos.
    return Vocabulary(meta["vocab_size"], meta.get("bos_id", meta["eos_id"]), meta["eos_id"], meta["pad_id"],
                      special.get("mask_id"), special.get("cls_id"), special.get("sep_id"), special.get("unk_id"),
                      tuple(special.get("special_ids", ())), tuple(special.get("sentinel_ids", ())),
                      tuple(meta.get("labels", ())))


def summarize(prepared: str | Path) -> str:
    """A few lines for people: where the corpus is, what it holds and what was dropped and why."""
    meta = read_meta(prepared)
    lines = [f"prepared {meta['name']} ({meta['source']}) in {prepared}"]
    for split, s in meta["splits"].items():
        lines.append(f"  {split}: {s['documents']} documents, {s['blocks']} samples of {meta['seq_len']} tokens, "
                     f"{s['tokens']} tokens in {len(s['shards'])} shard(s)")
    counts = meta["counts"]
    dropped = {k: v for k, v in counts.items() if k.startswith("dropped_") or k in SKIP_COUNTS}
    lines.append("  dropped/skipped: " + (", ".join(f"{k}={v}" for k, v in dropped.items()) or "none"))
    lines.append(f"  vocab_size={meta['vocab_size']} tokenizer_sha256={str(meta['tokenizer_sha256'])[:12]} "
                 f"engine={meta['engine']} built in {meta['seconds']}s")
    return "\n".join(lines)


SKIP_COUNTS = ("empty_files", "malformed_json", "missing_field", "corrupt_shards", "utf8_bytes_replaced",
               "blank_lines", "tokens_dropped_last_block")
