"""Where a run lives: its directory in checkpoint storage, its metadata file, and resolving resume targets."""

import json
import os
import time
from dataclasses import dataclass

import fsspec

from common.errors import LmforgeError
from orchestrator import checkpoint
from orchestrator.schema import LmforgeConfig

RUN_INFO = "lmforge_run.json"


def default_run_name(cfg: LmforgeConfig) -> str:
    return f"{cfg.model.name}-{cfg.objective.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def storage_root(cfg: LmforgeConfig) -> str:
    return (cfg.checkpoint.storage or f"{cfg.paths.root}/runs").rstrip("/")


def write_run_info(run_dir: str, info: dict) -> None:
    fs, path = fsspec.core.url_to_fs(run_dir)
    fs.makedirs(path, exist_ok=True)
    with fs.open(f"{path}/{RUN_INFO}", "w") as f:
        json.dump(info, f, indent=1)


def read_run_info(run_dir: str) -> dict | None:
    fs, path = fsspec.core.url_to_fs(run_dir)
    if not fs.exists(f"{path}/{RUN_INFO}"):
        return None
    with fs.open(f"{path}/{RUN_INFO}") as f:
        return json.load(f)


@dataclass
class Target:
    run_dir: str
    checkpoint: str | None  # the named checkpoint, else the run's newest complete one
    named: bool  # a checkpoint directory was named, rather than a run
    rejected: list[tuple[str, str]]  # the run's checkpoint directories that are not complete, and why


def absolute(target: str) -> str:
    """A relative local path means one under the user's working directory, wherever it is used later (a Ray
    worker runs elsewhere); URIs and MLflow run ids stay as they are."""
    return target if "://" in target or not os.path.exists(target) else os.path.abspath(target)


def resolve(target: str, cfg: LmforgeConfig, checksums: bool = False) -> Target:
    """Turn a run dir, a checkpoint dir or an MLflow run id into the run and the checkpoint to use."""
    target = absolute(target).rstrip("/")
    fs, path = fsspec.core.url_to_fs(target)
    if fs.exists(path):
        if fs.exists(f"{path}/{checkpoint.MARKER}") or path.rsplit("/", 1)[-1].startswith("checkpoint_"):
            marker, why = checkpoint.inspect(target, checksums)
            if marker is None:
                raise LmforgeError(f"checkpoint {target} cannot be used: {why}; name an earlier checkpoint, or the "
                                   "run directory to use its newest complete one")
            return Target(target.rsplit("/", 1)[0], target, True, [])
        found = checkpoint.scan(target, checksums)
        if read_run_info(target) is not None or found.complete or found.rejected:
            return Target(target, found.latest(), False, found.rejected)
        raise LmforgeError(f"{target} is neither an lmforge run directory nor a checkpoint directory")
    run_dir = _run_dir_from_mlflow(target, cfg)
    found = checkpoint.scan(run_dir, checksums)
    return Target(run_dir, found.latest(), False, found.rejected)


def _run_dir_from_mlflow(run_id: str, cfg: LmforgeConfig) -> str:
    from orchestrator.redact import redact_value
    from orchestrator.tracking import connect, tracking_uri

    uri = redact_value(tracking_uri(cfg.tracking, cfg.paths.root))
    try:
        run = connect(cfg.tracking, cfg.paths.root).get_run(run_id)
    except Exception:
        raise LmforgeError(f"{run_id!r} is not a path, and no MLflow run with that id exists in {uri}") from None
    run_dir = run.data.tags.get("lmforge.run_dir")
    if not run_dir:
        raise LmforgeError(f"MLflow run {run_id} was not started by lmforge train (no lmforge.run_dir tag)")
    return run_dir
