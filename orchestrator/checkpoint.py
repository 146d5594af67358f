"""Checkpoints: every rank's DeepSpeed shards plus step, RNG, data position and config; committed last.

Each rank saves into its own local directory, records the size and sha256 of every file it wrote, and hands
the directory to `ray.train.report`, which uploads it into the run's storage (a local path or any fsspec
URI). Ray uploads each rank's files independently, so only after every rank's upload has returned (a
barrier after the report) does rank 0 write `lmforge_checkpoint.json` straight into storage. The marker
lists every file with its size and checksum. A checkpoint counts as complete only when its marker exists
and every listed file is present at its recorded size (and checksum, with `checkpoint.verify=true`): a
rank that dies at any point of a save, mid-upload included, leaves a directory that resume skips.

lmforge's markers alone decide which checkpoints exist and which are kept. Ray's checkpoint manager keeps
every checkpoint (lmforge prunes), and its snapshot is dropped before each run starts, so a checkpoint
directory deleted by hand, or a snapshot from another Ray version, can never block a resume.
"""

import argparse
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np

from common.errors import LmforgeError
from common.processes import pid_alive
from orchestrator.quiet import muted

MARKER = "lmforge_checkpoint.json"
DS_TAG = "ds"
UNIVERSAL_TAG = "ds_universal"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of reported checkpoints
# Test hooks, "<step>:<flag file>"; the flag makes the fault happen once.
FAULT_ENV = "LMFORGE_FAULT_BEFORE_COMMIT"  # rank 0 dies after every upload, before the marker
TORN_UPLOAD_ENV = "LMFORGE_FAULT_TORN_UPLOAD"  # the last rank dies halfway through uploading a shard
# torch is imported inside the functions that run on workers: the driver only lists and reads markers, and
# its torch import (about 1 s) then overlaps Ray's start-up instead of preceding it.


@dataclass
class Restored:
    step: int
    loader_state: dict
    world_size: int
    selection: dict | None = None  # model selection's state (orchestrator.selection), for early stopping


def dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


STAGING_PREFIX = "lmforge-ckpt-"


def staging_dir() -> tempfile.TemporaryDirectory:
    """Local directory a rank saves into before Ray persists it, or converts a checkpoint in when resharding;
    named by pid so orphans can be found."""
    return tempfile.TemporaryDirectory(prefix=f"{STAGING_PREFIX}{os.getpid()}-")


def remove_orphaned_staging(root: str | None = None) -> list[str]:
    """A rank killed mid-save (the failures lmforge recovers from) leaves its staging directory, a
    checkpoint-sized copy, behind; remove those whose process is gone. Returns what was removed."""
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*-*"):
        pid = path.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


def rng_state() -> dict:
    import torch

    # numpy's whole bit-generator state: key, position and the cached Gaussian, not just the key.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    saved = state["numpy"]
    if isinstance(saved, list):  # checkpoints written before the whole state was kept
        np.random.set_state(("MT19937", np.asarray(saved, dtype=np.uint32), 0, 0, 0.0))
    else:
        np.random.set_state((saved["kind"], np.asarray(saved["keys"], dtype=np.uint32), saved["pos"],
                             saved["has_gauss"], saved["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def file_digests(local_dir: Path) -> dict[str, dict]:
    """Size and sha256 of every file under `local_dir`, by relative path."""
    from data.shards import sha256_file

    return {str(path.relative_to(local_dir)): {"size": path.stat().st_size, "sha256": sha256_file(path)}
            for path in sorted(p for p in local_dir.rglob("*") if p.is_file())}


def save_shards(engine, local_dir: Path, step: int, rank: int, tokenizer) -> dict[str, dict]:
    """Collective: every rank writes its shards and RNG state into `local_dir`; returns this rank's files with
    their sizes and checksums, for the marker."""
    import torch

    engine.save_checkpoint(str(local_dir), tag=DS_TAG, client_state={"step": step})
    if rank == 0 and tokenizer is not None:  # the checkpoint carries its tokenizer, so export needs nothing else
        tokenizer.save_pretrained(str(local_dir / "tokenizer"))
    # Our own file, read back with weights_only=True: plain tensors, tuples, lists and numbers only.
    torch.save(rng_state(), local_dir / f"rng_rank{rank}.pt")
    return file_digests(local_dir)


def torn_upload_fault(step: int, rank: int, world_size: int, uri: str):
    """Test hook (TORN_UPLOAD_ENV): an upload function for ray.train.report with which the last rank writes
    half of one shard into storage under its real name, then dies, as a node lost mid-upload would."""
    fault = os.environ.get(TORN_UPLOAD_ENV, "")
    if rank != world_size - 1 or fault.split(":")[0] != str(step) or os.path.exists(flag := fault.split(":", 1)[1]):
        return None

    def upload(ray_checkpoint, dir_name):
        import time

        Path(flag).touch()
        local = Path(ray_checkpoint.path)
        victim = max((p for p in local.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        fs, root = fsspec.core.url_to_fs(uri)
        target = f"{root}/{victim.relative_to(local)}"
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(target, "wb") as f:
            f.write(victim.read_bytes()[: victim.stat().st_size // 2])
        time.sleep(1.0)  # the other ranks finish their uploads meanwhile
        os._exit(18)

    return upload


def crash_before_commit(step: int) -> None:
    fault = os.environ.get(FAULT_ENV, "")  # test hook: rank 0 dies after every upload, before the marker
    if fault.split(":")[0] == str(step) and not os.path.exists(flag := fault.split(":", 1)[1]):
        Path(flag).touch()
        os._exit(17)


def commit(uri: str, marker: dict) -> None:
    """Write the marker into the checkpoint's storage directory: the last write of a save. Only rank 0 calls
    this, after every rank's upload has returned."""
    fs, root = fsspec.core.url_to_fs(uri)
    fs.makedirs(root, exist_ok=True)
    text = json.dumps(marker, indent=1)
    if "file" in fs.protocol:
        # A rename is atomic on a filesystem, so a torn write never looks like a marker.
        tmp = f"{root}/{MARKER}.tmp-{os.getpid()}"
        with fs.open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, f"{root}/{MARKER}")
    else:  # an object store makes an object visible only once its upload is whole
        with fs.open(f"{root}/{MARKER}", "w") as f:
            f.write(text)


def inspect(uri: str, checksums: bool = False) -> tuple[dict | None, str | None]:
    """(marker, None) for a complete checkpoint, else (None, why it is not complete)."""
    fs, root = fsspec.core.url_to_fs(uri)
    fs.invalidate_cache(root)  # another process may have written here since this one last looked
    try:
        stored = {p[len(root) + 1:]: info.get("size") for p, info in fs.find(root, detail=True).items()}
    except FileNotFoundError:
        return None, "it does not exist"
    if MARKER not in stored:
        return None, "it has no completion marker (its save never finished)"
    try:
        with fs.open(f"{root}/{MARKER}") as f:
            marker = json.load(f)
        files = marker["files"]
    except (ValueError, KeyError, TypeError) as e:
        return None, f"its marker is unreadable ({e})"
    if isinstance(files, list):  # markers written before sizes were recorded list names only
        files = {name: {} for name in files}
    for name, expected in files.items():
        if name not in stored:
            return None, f"{name} is missing"
        if "size" in expected and stored[name] != expected["size"]:
            return None, f"{name} is {stored[name]} bytes, its marker says {expected['size']} (a torn upload)"
    if checksums:
        for name, expected in files.items():
            if "sha256" in expected and stored_sha256(fs, f"{root}/{name}") != expected["sha256"]:
                return None, f"{name} does not match its checksum (corrupted in storage)"
    return marker, None


def stored_sha256(fs, path: str) -> str:
    from data.shards import sha256_stream

    with fs.open(path, "rb") as f:
        return sha256_stream(f)


def complete_marker(path: str, checksums: bool = False) -> dict | None:
    """The checkpoint's marker if the checkpoint is complete, else None."""
    return inspect(path, checksums)[0]


def is_complete(path: str) -> bool:
    return complete_marker(path) is not None


def read_marker(path: str) -> dict:
    with fsspec.open(f"{path.rstrip('/')}/{MARKER}") as f:
        return json.load(f)


@dataclass
class Scan:
    complete: list[tuple[int, str]]  # (step, uri), oldest first
    rejected: list[tuple[str, str]]  # (uri, why), for checkpoint directories that are not complete

    def latest(self) -> str | None:
        return self.complete[-1][1] if self.complete else None


def scan(run_dir: str, checksums: bool = False) -> Scan:
    """Every checkpoint directory of a run, sorted into complete ones and the rest with the reason."""
    fs, root = fsspec.core.url_to_fs(run_dir)
    fs.invalidate_cache(root)  # other processes write here; an object store's cached listing goes stale
    if not fs.exists(root):
        return Scan([], [])
    protocol = run_dir.split("://")[0] + "://" if "://" in run_dir else ""
    complete, rejected = [], []
    for entry in sorted(fs.ls(root, detail=False)):
        if step_of(entry) is None:  # not checkpoint_<step>: Ray's snapshot, the run info
            continue
        uri = protocol + entry if protocol and not entry.startswith(protocol) else entry
        marker, why = inspect(uri, checksums)
        if marker is None:
            rejected.append((uri, why))
        else:
            complete.append((marker["step"], uri))
    return Scan(sorted(complete), rejected)


def list_checkpoints(run_dir: str, checksums: bool = False) -> list[tuple[int, str]]:
    """Complete checkpoints under a run directory as (step, uri), oldest first."""
    return scan(run_dir, checksums).complete


def latest_checkpoint(run_dir: str, checksums: bool = False) -> str | None:
    return scan(run_dir, checksums).latest()


def skipped_line(uri: str, why: str) -> str:
    return f"skipping checkpoint {uri}: {why}"


def remove(uri: str) -> None:
    fs, root = fsspec.core.url_to_fs(uri)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def remove_rejected(found: Scan, say) -> None:
    """Delete checkpoint directories that can never be used, saying why, so a re-save of the same step starts
    from an empty directory. Only called while no save is in progress (at start, before any rank saves)."""
    for uri, why in found.rejected:
        say(f"removing checkpoint {uri}: {why}")
        remove(uri)


def prune(run_dir: str, keep_last: int, newest_step: int, keep_steps: set[int] = frozenset()) -> None:
    """After a commit: keep the newest `keep_last` complete checkpoints and those of `keep_steps` (the best
    one), and drop incomplete directories older than the one just committed (saves that were interrupted);
    lmforge, not Ray, decides what is kept."""
    found = scan(run_dir)
    for step, uri in found.complete[:-keep_last]:
        if step not in keep_steps:
            remove(uri)
    for uri, _ in found.rejected:
        if step_of(uri) < newest_step:
            remove(uri)


def step_of(uri: str) -> int | None:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    digits = name[len("checkpoint_"):]
    return int(digits) if name.startswith("checkpoint_") and digits.isdigit() else None


def drop_ray_snapshot(run_dir: str) -> None:
    """Ray Train restores its checkpoint manager from this snapshot and refuses to start when a checkpoint it
    lists is gone (deleted by hand, or pruned by lmforge) or was written by another Ray version. lmforge's
    markers are the record of what exists, so the snapshot is dropped before every start."""
    fs, root = fsspec.core.url_to_fs(run_dir)
    if fs.exists(f"{root}/{RAY_SNAPSHOT}"):
        fs.rm(f"{root}/{RAY_SNAPSHOT}")


def restore(engine, checkpoint_dir: Path, rank: int, reshard: bool = False) -> Restored:
    """Load every rank's state from a local copy of a complete checkpoint.

    With `reshard`, the checkpoint was written by a different number of workers: it is first converted to
    DeepSpeed's universal format, which the engine (built with load_universal) re-partitions on load.
    """
    import torch
    import torch.distributed as dist

    marker = json.loads((checkpoint_dir / MARKER).read_text())
    check_safe_to_load(checkpoint_dir)
    if reshard:
        with staging_dir() as tmp:
            to_universal(checkpoint_dir / DS_TAG, Path(tmp) / UNIVERSAL_TAG)
            engine.load_checkpoint(tmp, tag=UNIVERSAL_TAG, load_optimizer_states=True,
                                   load_lr_scheduler_states=True)
    else:
        engine.load_checkpoint(str(checkpoint_dir), tag=DS_TAG, load_optimizer_states=True,
                               load_lr_scheduler_states=True)
    rng_file = checkpoint_dir / f"rng_rank{rank}.pt"
    if marker["world_size"] == dist.get_world_size() and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        # A different world size has no one-to-one RNG mapping; derive a fresh, reproducible state.
        seed = (marker["config"]["seed"] * 1_000_003 + marker["step"] * 1_009 + rank) % 2**31
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
    return Restored(step=marker["step"], loader_state=marker["loader"], world_size=marker["world_size"],
                    selection=marker.get("selection"))


def data_identity(prepared: str, shuffle: bool) -> dict:
    """What the loader's position means: which prepared corpus, in which order, cut into which shards. A
    position saved against one identity is a different set of samples under another."""
    from data.prepared import read_meta

    meta = read_meta(prepared)
    train = meta["splits"]["train"]
    return {"prepared": meta.get("key", Path(prepared).name), "shuffle": shuffle,
            "num_samples": sum(s["samples"] for s in train["shards"]),
            "shard_sizes": [s["samples"] for s in train["shards"]]}


def data_changes(saved: dict | None, now: dict) -> list[str]:
    """How the data now differs from the data a checkpoint's loader state was saved against, in words."""
    if not saved:  # checkpoints written before the identity was recorded: the sample count still protects
        return []
    changes = []
    if saved["shuffle"] != now["shuffle"]:
        changes.append(f"data.shuffle was {saved['shuffle']}, now {now['shuffle']}")
    if saved["prepared"] != now["prepared"]:
        changes.append(f"the prepared corpus was {saved['prepared']}, now {now['prepared']} (a data config "
                       "key, the tokenizer or an input file changed)")
    elif saved["shard_sizes"] != now["shard_sizes"]:
        changes.append(f"the train split's shards were {len(saved['shard_sizes'])} holding "
                       f"{saved['num_samples']} samples, now {len(now['shard_sizes'])} holding {now['num_samples']}")
    return changes


def check_same_data(loader_state: dict, now: dict, where: str, keys_set: list[str] = ()) -> None:
    """Refuse to continue a data position on data it does not describe; `keys_set` are the data keys the
    resuming command line changed, the likely cause."""
    if changes := data_changes(loader_state.get("data"), now):
        named = f" (this command line sets {', '.join(keys_set)})" if keys_set else ""
        raise LmforgeError(f"cannot resume from {where}: it was trained on different data{named}, so its position "
                           f"would continue in a different sample order: {'; '.join(changes)}. Resume with the "
                           "original data settings, or start a new run")


def to_universal(ds_dir: Path, out: Path) -> None:
    """DeepSpeed's universal checkpoint: optimizer state per parameter, loadable at any worker count."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(ds_dir), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with muted():
        ds_to_universal.main(args)


def deepspeed_safe_globals() -> list:
    """The only non-tensor classes DeepSpeed pickles into its checkpoint files."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def check_safe_to_load(local: Path) -> None:
    """Refuse checkpoint files whose pickles reference anything beyond tensors and DeepSpeed's own types.

    DeepSpeed's consolidation unpickles with weights_only=False; a file we did not write could run code.
    """
    import torch

    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        for path in sorted([*(local / DS_TAG).glob("*.pt"), *local.glob("rng_rank*.pt")]):
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:
                # torch's own message ends in advice to load with weights_only=False: exactly what must not
                # happen with a file that may not be ours, so it is not passed on.
                raise LmforgeError(f"refusing to load {path}: the file is corrupt or holds objects other than "
                                   "tensors and DeepSpeed's own state; lmforge never unpickles arbitrary "
                                   "objects from a checkpoint") from None


def directory_size(path: str) -> int:
    fs, root = fsspec.core.url_to_fs(path)
    return sum(info.get("size", 0) or 0 for info in fs.find(root, detail=True).values())
