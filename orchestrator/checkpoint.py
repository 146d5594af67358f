"""Checkpoints: every rank's DeepSpeed shards plus step, RNG, data position and config; committed last.

Each rank saves into its own local directory and hands it to `ray.train.report`, which persists all ranks'
files into one checkpoint directory in the run's storage (local path or any fsspec URI). Rank 0 writes
`lmforge_checkpoint.json` only after every rank has finished writing, and it lists every file the
checkpoint must contain. A checkpoint counts as complete only when that marker exists and every listed
file is present, so a crash at any point during a save leaves a directory that resume skips.
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
from orchestrator.quiet import muted

MARKER = "lmforge_checkpoint.json"
DS_TAG = "ds"
UNIVERSAL_TAG = "ds_universal"
FAULT_ENV = "LMFORGE_FAULT_BEFORE_COMMIT"  # test hook: crash after the shards, before the marker
# torch is imported inside the functions that run on workers: the driver only lists and reads markers, and
# its torch import (about 1 s) then overlaps Ray's start-up instead of preceding it.


@dataclass
class Restored:
    step: int
    loader_state: dict
    world_size: int


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
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def rng_state() -> dict:
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()[1].tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(("MT19937", np.asarray(state["numpy"], dtype=np.uint32), 0, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_shards(engine, local_dir: Path, step: int, rank: int, world_size: int, loader_state: dict,
                metrics: dict, config: dict, tokenizer) -> None:
    """Collective: every rank writes its shards into `local_dir`; rank 0 then commits the marker."""
    import torch
    import torch.distributed as dist

    engine.save_checkpoint(str(local_dir), tag=DS_TAG, client_state={"step": step})
    if rank == 0:  # the checkpoint carries its tokenizer, so export needs nothing else
        tokenizer.save_pretrained(str(local_dir / "tokenizer"))
    # Our own file, read back with weights_only=True: plain tensors, tuples and ints only.
    torch.save(rng_state(), local_dir / f"rng_rank{rank}.pt")
    mine = sorted(str(p.relative_to(local_dir)) for p in local_dir.rglob("*") if p.is_file())
    everyone = [None] * world_size
    dist.all_gather_object(everyone, mine)
    if rank != 0:
        return
    fault = os.environ.get(FAULT_ENV, "")  # "<step>:<flag file>"; the flag makes the crash happen once
    if fault.split(":")[0] == str(step) and not os.path.exists(flag := fault.split(":", 1)[1]):
        Path(flag).touch()
        os._exit(17)
    files = sorted({f for rank_files in everyone for f in rank_files})
    marker = {"step": step, "world_size": world_size, "loader": loader_state, "metrics": metrics,
              "config": config, "files": files}
    # Written to a temporary name and renamed, so a torn write never looks like a marker.
    tmp = local_dir / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1))
    tmp.rename(local_dir / MARKER)


def complete_marker(path: str) -> dict | None:
    """The checkpoint's marker if the checkpoint is complete (marker present, every listed file present)."""
    fs, root = fsspec.core.url_to_fs(path)
    fs.invalidate_cache(root)  # another process may have written here since this one last looked
    if not fs.exists(f"{root}/{MARKER}"):
        return None
    with fs.open(f"{root}/{MARKER}") as f:
        marker = json.load(f)
    present = {p[len(root) + 1:] for p in fs.find(root)}
    return marker if all(f in present for f in marker["files"]) else None


def is_complete(path: str) -> bool:
    return complete_marker(path) is not None


def read_marker(path: str) -> dict:
    with fsspec.open(f"{path.rstrip('/')}/{MARKER}") as f:
        return json.load(f)


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints under a run directory as (step, uri), oldest first."""
    fs, root = fsspec.core.url_to_fs(run_dir)
    fs.invalidate_cache(root)  # other processes write here; an object store's cached listing goes stale
    if not fs.exists(root):
        return []
    protocol = run_dir.split("://")[0] + "://" if "://" in run_dir else ""
    found = []
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        uri = protocol + entry if protocol and not entry.startswith(protocol) else entry
        if name.startswith("checkpoint_") and (marker := complete_marker(uri)) is not None:
            found.append((marker["step"], uri))
    return sorted(found)


def latest_checkpoint(run_dir: str) -> str | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


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
    return Restored(step=marker["step"], loader_state=marker["loader"], world_size=marker["world_size"])


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
        for path in sorted((local / DS_TAG).glob("*.pt")):
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise LmforgeError(f"refusing to load {path}: it is not a plain DeepSpeed checkpoint file "
                                   f"({str(e).splitlines()[0][:200]})") from None


def directory_size(path: str) -> int:
    fs, root = fsspec.core.url_to_fs(path)
    return sum(info.get("size", 0) or 0 for info in fs.find(root, detail=True).values())
