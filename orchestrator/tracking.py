"""MLflow tracking, driver side: one run per job, opened, resumed and closed here, with retries through outages.

Rank 0 feeds the run through orchestrator.tracker.RunTracker.
"""

import contextlib
import dataclasses
import logging
import math
import os
import posixpath
import re
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

from common.errors import LmforgeError
from orchestrator.redact import REDACTED, is_secret_key, redact_config, redact_value
from orchestrator.run_record import (
    CONFIG_FILE,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    NOTE_TAG,
    OVERRIDES_FILE,
    RunRecord,
    description,
    resume_section,
    truncate,
    yaml_scalar,
)
from orchestrator.schema import TrackingConfig

log = logging.getLogger("lmforge.tracking")

STATUSES = ("FINISHED", "FAILED", "KILLED")

# MLflow's limits (mlflow.utils.validation); a value past them fails the whole request.
MAX_KEY_LENGTH = 250
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000
MAX_PARAMS_PER_BATCH = 100
# A value past a limit is cut with a marker saying so, instead of failing the request and the run with it.
PARAM_TRUNCATED = f"...[truncated, full value in {CONFIG_FILE}]"
TAG_TRUNCATED = "...[truncated]"
# Params stored before values were written as YAML, as they compare with today's.
LEGACY_PARAMS = {"None": "null", "True": "true", "False": "false"}

# Errors that will fail again however often they are retried; anything else (refused connection, timeout,
# 5xx, a locked SQLite file) is treated as an outage and retried.
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                    "INVALID_STATE", "BAD_REQUEST", "MALFORMED_REQUEST"}

def flatten_params(params: Mapping, prefix: str = "") -> dict[str, object]:
    """{"trainer": {"lr": 0.003}} -> {"trainer.lr": 0.003}; already-flat keys pass through."""
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        params = dataclasses.asdict(params)
    flat = {}
    for key, value in params.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, path))
        else:
            flat[path] = value
    return flat


def redact_params(params: Mapping) -> dict[str, str]:
    """Flatten, redact and truncate `params` into what MLflow may store, each value written as YAML."""
    return {safe_key(key): truncate(yaml_scalar(value), MAX_PARAM_LENGTH, PARAM_TRUNCATED)
            for key, value in redact_config(flatten_params(params)).items()}  # the same masking as run files


def redact_tags(tags: Mapping) -> dict[str, str]:
    return {safe_key(k): REDACTED if is_secret_key(str(k)) else
            truncate(redact_value(str(v)), MAX_TAG_LENGTH, TAG_TRUNCATED) for k, v in tags.items()}


def safe_key(key: str) -> str:
    """A param/metric/tag key MLflow accepts: only [/\\w.\\- :], no '..' or leading '/', at most 250 chars."""
    key = posixpath.normpath(re.sub(r"[^/\w.\- :]", "_", str(key))[:MAX_KEY_LENGTH]).lstrip("/")
    return "_" + key if key in ("", ".") or key.startswith("..") else key


# --- connection ----------------------------------------------------------------------------------------------
def tracking_uri(cfg: TrackingConfig, root: str) -> str:
    """The configured URI, else a SQLite store under the output root (absolute: Ray workers run elsewhere)."""
    return cfg.tracking_uri or f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def artifact_location(root: str) -> str:
    return (Path(root).resolve() / "mlartifacts").as_uri()


def ui_command(cfg: TrackingConfig, root: str, host: str, port: int) -> list[str]:
    """The MLflow UI (the tracking server) over this config's store, as `lmforge ui` runs it.

    One worker: a laptop's UI serves one person, and each extra worker is another process holding the store.
    """
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri(cfg, root),
            "--default-artifact-root", artifact_location(root), "--host", host, "--port", str(port),
            "--workers", "1"]


def is_remote(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https") or uri.startswith("databricks")


def bound_http_waits(cfg: TrackingConfig) -> None:
    """Stop MLflow's REST client from retrying for minutes; lmforge retries itself, off the training thread.

    setdefault, so a user's own MLFLOW_HTTP_REQUEST_* settings win (and then bound the waits instead).
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, math.ceil(cfg.request_timeout_s))))


def connect(cfg: TrackingConfig, root: str):
    """An MlflowClient for the job's store; never the fluent API, whose active run is process-global."""
    from mlflow import MlflowClient

    bound_http_waits(cfg)
    uri = tracking_uri(cfg, root)
    if not cfg.tracking_uri:
        Path(root).mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def is_permanent(error: BaseException) -> bool:
    from orchestrator.credentials import is_refusal

    return (isinstance(error, LmforgeError) or getattr(error, "error_code", None) in PERMANENT_ERRORS
            or is_refusal(error))


def with_retries(call, window_s: float):
    """Run `call`, retrying outages with backoff until `window_s` has passed; then re-raise."""
    deadline = time.monotonic() + window_s
    delay = 0.5
    while True:
        try:
            return call()
        except Exception as error:
            if is_permanent(error) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay *= 2


# --- driver side ---------------------------------------------------------------------------------------------
def start_run(cfg: TrackingConfig, root: str, run_name: str, params: Mapping, tags: Mapping,
              run_id: str | None = None, record: RunRecord | None = None) -> str | None:
    """Create the job's one MLflow run, or reopen `run_id` as RUNNING; returns its id (None when backend=none).
    `record` adds the description and the config/overrides files (orchestrator.run_record).

    An unreachable server here is a config mistake, so it fails the submit before any compute is spent.
    """
    if cfg.backend == "none":
        return None
    shown = redact_value(tracking_uri(cfg, root))
    try:
        client = connect(cfg, root)
        window = cfg.request_timeout_s
        if run_id:
            resume_run(client, cfg, run_id, params, tags, shown, record)
            return run_id
        experiment_id = with_retries(lambda: get_experiment(client, cfg, root, shown), window)
        if record is not None:
            tags = dict(tags) | {NOTE_TAG: description(record, parent_experiment(client, record.parent_run_id))}
        run = with_retries(lambda: client.create_run(
            experiment_id, run_name=run_name, tags=redact_tags(tags) | {"lmforge.run_name": run_name}), window)
        try:
            log_params(client, run.info.run_id, redact_params(params), window)
        except Exception:
            with contextlib.suppress(Exception):  # the original error is the one worth reporting
                client.set_terminated(run.info.run_id, "FAILED")
            raise
        if record is not None:
            log_files(client, run.info.run_id, record.files, window)
        return run.info.run_id
    except LmforgeError:
        raise
    except Exception as error:
        from orchestrator.credentials import refusal_error

        if (refused := refusal_error(error, shown, cfg.experiment)) is not None:
            raise refused from None
        raise LmforgeError(f"cannot start an MLflow run at tracking.tracking_uri={shown}: "
                           f"{type(error).__name__}: {redact_value(str(error))[:300]}. Start the tracking server, "
                           "fix tracking.tracking_uri, or run with tracking=none") from error


def parent_experiment(client, parent_run_id: str | None) -> str | None:
    """The experiment of the run this one continues from, for a link to it; None when that run is not in
    this store (a model trained against another server)."""
    if not parent_run_id:
        return None
    try:
        return client.get_run(parent_run_id).info.experiment_id
    except Exception:
        return None


def log_files(client, run_id: str, files: Mapping[str, str], window_s: float) -> None:
    """Upload text artifacts. A failure is a warning: the run and its metrics matter more than these copies."""
    for artifact_file, text in files.items():
        try:
            with_retries(lambda text=text, name=artifact_file: client.log_text(run_id, text, name), window_s)
        except Exception as error:
            log.warning("could not upload %s to MLflow run %s: %s", artifact_file, run_id,
                        redact_value(str(error))[:300])


def get_experiment(client, cfg: TrackingConfig, root: str, shown: str) -> str:
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        # Without an explicit location a local store puts artifacts in ./mlruns of whatever the cwd is.
        location = None if is_remote(tracking_uri(cfg, root)) else artifact_location(root)
        try:
            return client.create_experiment(cfg.experiment, artifact_location=location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception as error:
            if getattr(error, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(cfg.experiment)  # another job created it just now
    if experiment.lifecycle_stage == "deleted":
        raise LmforgeError(f"MLflow experiment {cfg.experiment!r} at {shown} is deleted; restore it "
                           "(mlflow experiments restore) or set tracking.experiment to another name")
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an older lmforge or by hand: open it on runs too
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def resume_run(client, cfg: TrackingConfig, run_id: str, params: Mapping, tags: Mapping, shown: str,
               record: RunRecord | None = None) -> None:
    """Reopen an existing run. Params are immutable in MLflow, so changed values are recorded as tags, and
    the description gains a section naming this resume's command line and the keys it changed."""
    window = cfg.request_timeout_s
    try:
        run = with_retries(lambda: client.get_run(run_id), window)
    except Exception as error:
        if getattr(error, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            raise LmforgeError(f"resume={run_id!r}: no such MLflow run at {shown}") from error
        raise
    if run.info.lifecycle_stage == "deleted":
        raise LmforgeError(f"resume={run_id!r}: the MLflow run at {shown} is deleted; restore it first")
    with_retries(lambda: client.update_run(run_id, status="RUNNING"), window)
    old = {k: LEGACY_PARAMS.get(v, v) for k, v in run.data.params.items()}
    new = redact_params(params)
    log_params(client, run_id, {k: v for k, v in new.items() if k not in old}, window)
    changed = {safe_key(f"lmforge.resumed.{k}"): v for k, v in new.items() if k in old and old[k] != v}
    resumed = {"lmforge.resumed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if record is not None:
        note = run.data.tags.get(NOTE_TAG, "") + "\n" + resume_section(record)
        # Past the tag limit the oldest resume sections go, keeping the command that created the run.
        resumed[NOTE_TAG] = note if len(note) <= MAX_TAG_LENGTH else note[:2000] + "\n\n...\n" + note[-5000:]
    set_tags(client, run_id, redact_tags(tags) | changed | resumed, window)
    if record is not None:
        log_files(client, run_id, with_resume_overrides(client, run_id, record), window)


def with_resume_overrides(client, run_id: str, record: RunRecord) -> dict[str, str]:
    """A resume's files, its overrides added under the run's earlier ones, so the file tells the whole story."""
    files = dict(record.files)
    if OVERRIDES_FILE not in files:
        return files
    earlier = ""
    try:
        if any(f.path == OVERRIDES_FILE for f in client.list_artifacts(run_id)):
            with tempfile.TemporaryDirectory() as tmp:
                earlier = Path(client.download_artifacts(run_id, OVERRIDES_FILE, tmp)).read_text()
    except Exception as error:  # the file then starts again from this resume
        log.warning("could not read %s of MLflow run %s: %s", OVERRIDES_FILE, run_id, redact_value(str(error))[:300])
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    files[OVERRIDES_FILE] = f"{earlier}# resumed {stamp}\n{files[OVERRIDES_FILE]}" if earlier else files[OVERRIDES_FILE]
    return files


def log_params(client, run_id: str, params: dict[str, str], window_s: float) -> None:
    from mlflow.entities import Param

    items = list(params.items())
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        batch = [Param(k, v) for k, v in items[i:i + MAX_PARAMS_PER_BATCH]]
        with_retries(lambda batch=batch: client.log_batch(run_id, params=batch), window_s)


def set_tags(client, run_id: str, tags: dict[str, str], window_s: float) -> None:
    from mlflow.entities import RunTag

    items = list(tags.items())
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        batch = [RunTag(k, v) for k, v in items[i:i + MAX_PARAMS_PER_BATCH]]
        with_retries(lambda batch=batch: client.log_batch(run_id, tags=batch), window_s)


def finish_run(cfg: TrackingConfig, root: str, run_id: str | None, status: str) -> bool:
    """Mark the run FINISHED, FAILED or KILLED. Never raises: it runs while handling the run's own end."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
    if cfg.backend == "none" or not run_id:
        return True
    try:
        client = connect(cfg, root)
        with_retries(lambda: client.set_terminated(run_id, status), 2 * cfg.request_timeout_s)
        return True
    except Exception as error:
        log.warning("could not mark MLflow run %s %s at %s (%s); it will show as RUNNING", run_id, status,
                    redact_value(tracking_uri(cfg, root)), redact_value(str(error))[:300])
        return False


def run_status(cfg: TrackingConfig, root: str, run_id: str) -> str | None:
    """The run's status now (FINISHED, FAILED, KILLED, RUNNING), or None when it cannot be read."""
    if cfg.backend == "none":
        return None
    try:
        return connect(cfg, root).get_run(run_id).info.status
    except Exception:  # start_run reports an unreachable server or a missing run properly
        return None


def restore_status(cfg: TrackingConfig, root: str, run_id: str | None, status: str) -> None:
    """Put a reopened run back to the status it had before this attempt. Never raises: it runs while
    handling a failed start."""
    if cfg.backend == "none" or not run_id:
        return
    try:
        client = connect(cfg, root)
        if status in STATUSES:
            with_retries(lambda: client.set_terminated(run_id, status), 2 * cfg.request_timeout_s)
        else:
            with_retries(lambda: client.update_run(run_id, status=status), 2 * cfg.request_timeout_s)
    except Exception as error:
        log.warning("could not return MLflow run %s to %s at %s (%s)", run_id, status,
                    redact_value(tracking_uri(cfg, root)), redact_value(str(error))[:300])
