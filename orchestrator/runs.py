"""Where a run lives: its directory in checkpoint storage, its metadata file, and resolving resume targets."""

import json
import time

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


def resolve(target: str, cfg: LmforgeConfig) -> tuple[str, str | None]:
    """Turn a run dir, a checkpoint dir or an MLflow run id into (run_dir, latest complete checkpoint)."""
    fs, path = fsspec.core.url_to_fs(target)
    if fs.exists(path):
        if fs.exists(f"{path}/{checkpoint.MARKER}"):
            if not checkpoint.is_complete(target):
                raise LmforgeError(f"checkpoint {target} is incomplete (a save was interrupted); "
                                   "use an earlier checkpoint or the run directory")
            return target.rstrip("/").rsplit("/", 1)[0], target
        if read_run_info(target) is not None or checkpoint.list_checkpoints(target):
            return target.rstrip("/"), checkpoint.latest_checkpoint(target)
        raise LmforgeError(f"{target} is neither an lmforge run directory nor a checkpoint directory")
    run_dir = _run_dir_from_mlflow(target, cfg)
    return run_dir, checkpoint.latest_checkpoint(run_dir)


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
