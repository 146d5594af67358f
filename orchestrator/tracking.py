"""MLflow tracking: one run per job, opened by the driver and fed from rank 0 through a queue that outlives outages."""

import contextlib
import dataclasses
import json
import logging
import math
import os
import posixpath
import re
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

from orchestrator.errors import LmforgeError
from orchestrator.redact import REDACTED, is_secret_key, redact_value
from orchestrator.schema import TrackingConfig

log = logging.getLogger("lmforge.tracking")

STATUSES = ("FINISHED", "FAILED", "KILLED")
CHECKPOINTS_FILE = "checkpoints.json"  # run artifact: every checkpoint's step, URI, size and metrics

# MLflow's limits (mlflow.utils.validation); a value past them fails the whole request.
MAX_KEY_LENGTH = 250
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

# Errors that will fail again however often they are retried; anything else (refused connection, timeout,
# 5xx, a locked SQLite file) is treated as an outage and retried.
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                    "INVALID_STATE", "BAD_REQUEST", "MALFORMED_REQUEST"}
MAX_BACKOFF_S = 30.0
FLUSH_RETRY_S = 0.5  # while someone waits in flush(), retry this often instead of backing off

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
    """Flatten, stringify, redact and truncate `params` into what MLflow may store."""
    out = {}
    for key, value in flatten_params(params).items():
        text = json.dumps(value, default=str) if isinstance(value, list | tuple | Mapping) else str(value)
        secret = is_secret_key(key) and value not in (None, "")
        out[safe_key(key)] = REDACTED if secret else redact_value(text)[:MAX_PARAM_LENGTH]
    return out


def redact_tags(tags: Mapping) -> dict[str, str]:
    return {safe_key(k): REDACTED if is_secret_key(str(k)) else redact_value(str(v))[:MAX_TAG_LENGTH]
            for k, v in tags.items()}


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
    return isinstance(error, LmforgeError) or getattr(error, "error_code", None) in PERMANENT_ERRORS


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
              run_id: str | None = None) -> str | None:
    """Create the job's one MLflow run, or reopen `run_id` as RUNNING; returns its id (None when backend=none).

    An unreachable server here is a config mistake, so it fails the submit before any compute is spent.
    """
    if cfg.backend == "none":
        return None
    shown = redact_value(tracking_uri(cfg, root))
    try:
        client = connect(cfg, root)
        window = cfg.request_timeout_s
        if run_id:
            return resume_run(client, cfg, run_id, params, tags, shown)
        experiment_id = with_retries(lambda: get_experiment(client, cfg, root, shown), window)
        run = with_retries(lambda: client.create_run(
            experiment_id, run_name=run_name, tags=redact_tags(tags) | {"lmforge.run_name": run_name}), window)
        try:
            log_params(client, run.info.run_id, redact_params(params), window)
        except Exception:
            with contextlib.suppress(Exception):  # the original error is the one worth reporting
                client.set_terminated(run.info.run_id, "FAILED")
            raise
        return run.info.run_id
    except LmforgeError:
        raise
    except Exception as error:
        raise LmforgeError(f"cannot start an MLflow run at tracking.tracking_uri={shown}: "
                           f"{type(error).__name__}: {redact_value(str(error))[:300]}. Start the tracking server, "
                           "fix tracking.tracking_uri, or run with tracking=none") from error


def get_experiment(client, cfg: TrackingConfig, root: str, shown: str) -> str:
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        # Without an explicit location a local store puts artifacts in ./mlruns of whatever the cwd is.
        location = None if is_remote(tracking_uri(cfg, root)) else artifact_location(root)
        try:
            return client.create_experiment(cfg.experiment, artifact_location=location)
        except Exception as error:
            if getattr(error, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(cfg.experiment)  # another job created it just now
    if experiment.lifecycle_stage == "deleted":
        raise LmforgeError(f"MLflow experiment {cfg.experiment!r} at {shown} is deleted; restore it "
                           "(mlflow experiments restore) or set tracking.experiment to another name")
    return experiment.experiment_id


def resume_run(client, cfg: TrackingConfig, run_id: str, params: Mapping, tags: Mapping, shown: str) -> str:
    """Reopen an existing run. Params are immutable in MLflow, so changed values are recorded as tags."""
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
    old = run.data.params
    new = redact_params(params)
    log_params(client, run_id, {k: v for k, v in new.items() if k not in old}, window)
    changed = {safe_key(f"lmforge.resumed.{k}"): v[:MAX_TAG_LENGTH]
               for k, v in new.items() if k in old and old[k] != v}
    resumed = {"lmforge.resumed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    set_tags(client, run_id, redact_tags(tags) | changed | resumed, window)
    return run_id


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


# --- worker side ---------------------------------------------------------------------------------------------
class RunTracker:
    """Rank 0's handle on the job's run. Calls only enqueue; a daemon thread sends, retrying through outages."""

    def __init__(self, cfg: TrackingConfig, root: str, run_id: str | None):
        self.run_id = run_id
        self.enabled = cfg.backend != "none" and run_id is not None
        self.dropped = 0  # oldest metrics thrown away because the queue was full during an outage
        if not self.enabled:
            return
        self._cfg, self._root = cfg, root
        self._shown = redact_value(tracking_uri(cfg, root))
        self._client = None
        self._cv = threading.Condition()
        self._metrics: deque[tuple[str, float, int, int]] = deque()  # key, value, timestamp ms, step
        self._tags: dict[str, str] = {}
        self._texts: dict[str, str] = {}  # artifact file -> latest content
        self._checkpoints: dict[int, dict] = {}  # step -> record; merged with the run's existing list once
        self._checkpoints_dirty = self._checkpoints_merged = False
        self._busy = self._stopping = False
        self._in_flight = 0  # metrics in the request being sent
        self._online = True
        self._flushers = 0
        self._retry_at = 0.0
        self._backoff = 0.0
        self._thread = threading.Thread(target=self._send_loop, name="lmforge-mlflow", daemon=True)
        self._thread.start()

    # Called from the training loop: each only takes a lock briefly, so a dead server costs nothing here.
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        try:
            now = int(time.time() * 1000)
            items = []
            for key, value in metrics.items():
                try:
                    items.append((safe_key(key), float(value), now, int(step)))
                except (TypeError, ValueError):
                    log.warning("metric %r=%r is not a number; not logged", key, value)
            self._enqueue(items)
        except Exception as error:  # tracking must never take the training loop down
            log.warning("could not queue metrics for MLflow: %s", error)

    def log_checkpoint(self, step: int, uri: str, size_bytes: int, metrics: Mapping[str, float]) -> None:
        """Record a checkpoint: metrics checkpoint/step and checkpoint/size_bytes, tags, and checkpoints.json."""
        if not self.enabled:
            return
        try:
            record = {"step": int(step), "uri": redact_value(str(uri)), "size_bytes": int(size_bytes),
                      "metrics": {str(k): float(v) for k, v in metrics.items()},
                      "timestamp": int(time.time() * 1000)}
            with self._cv:
                self._checkpoints[record["step"]] = record
                self._checkpoints_dirty = True
                self._tags.update({"lmforge.checkpoint.latest_step": str(record["step"]),
                                   "lmforge.checkpoint.latest_uri": record["uri"][:MAX_TAG_LENGTH]})
            self.log_metrics({"checkpoint/step": step, "checkpoint/size_bytes": size_bytes}, step)
        except Exception as error:
            log.warning("could not queue checkpoint record for MLflow: %s", error)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Upload `text` as a run artifact; a later call for the same file replaces a pending one."""
        if self.enabled:
            with self._cv:
                self._texts[artifact_file] = text
                self._cv.notify_all()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.enabled:
            with self._cv:
                self._tags.update(redact_tags(tags))
                self._cv.notify_all()

    @property
    def pending(self) -> int:
        """Metrics queued and not yet acknowledged by the server."""
        return len(self._metrics) + self._in_flight if self.enabled else 0

    def flush(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for everything queued to reach the server; True when it all did."""
        if not self.enabled:
            return True
        deadline = time.monotonic() + timeout_s
        with self._cv:
            self._flushers += 1
            self._retry_at = min(self._retry_at, time.monotonic() + FLUSH_RETRY_S)
            self._cv.notify_all()
            try:
                while self._has_work() or self._busy:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._thread.is_alive():
                        return False
                    self._cv.wait(remaining)
                return True
            finally:
                self._flushers -= 1

    def close(self, timeout_s: float = 30.0) -> None:
        """Flush for up to `timeout_s`, then stop the sender; whatever is still queued is reported and lost."""
        if not self.enabled or self._stopping:
            return
        if self.dropped:
            self.set_tags({"lmforge.tracking.dropped_metrics": str(self.dropped)})
        drained = self.flush(timeout_s)
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout=1.0)  # it may be inside a request; as a daemon it cannot block exit
        if not drained:
            log.warning("MLflow at %s unreachable at close: %d metrics for run %s were not sent", self._shown,
                        len(self._metrics), self.run_id)
        if self.dropped:
            log.warning("MLflow run %s: %d metrics were dropped during an outage (tracking.max_queued_metrics=%d)",
                        self.run_id, self.dropped, self._cfg.max_queued_metrics)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- sender thread ---------------------------------------------------------------------------------------
    def _enqueue(self, items: list) -> None:
        with self._cv:
            self._metrics.extend(items)
            self._trim()
            self._cv.notify_all()

    def _trim(self) -> None:
        overflow = len(self._metrics) - self._cfg.max_queued_metrics
        if overflow > 0:
            if not self.dropped:
                log.warning("MLflow queue full (tracking.max_queued_metrics=%d); dropping the oldest metrics",
                            self._cfg.max_queued_metrics)
            for _ in range(overflow):
                self._metrics.popleft()
            self.dropped += overflow

    def _has_work(self) -> bool:
        return bool(self._metrics or self._tags or self._texts or self._checkpoints_dirty)

    def _take_work(self) -> tuple[str, object]:
        """One unit of work, removed from the queues; _give_back puts it back if sending fails."""
        if self._metrics:
            return "metrics", [self._metrics.popleft()
                               for _ in range(min(len(self._metrics), MAX_METRICS_PER_BATCH))]
        if self._tags:
            keys = list(self._tags)[:MAX_PARAMS_PER_BATCH]
            return "tags", {k: self._tags.pop(k) for k in keys}
        if self._checkpoints_dirty:
            self._checkpoints_dirty = False
            return "checkpoints", None
        artifact_file = next(iter(self._texts))
        return "text", (artifact_file, self._texts.pop(artifact_file))

    def _give_back(self, kind: str, work) -> None:
        if kind == "metrics":
            self._metrics.extendleft(reversed(work))  # keeps order, and the trim drops the oldest
            self._trim()
        elif kind == "tags":
            self._tags = work | self._tags  # a newer value set meanwhile wins
        elif kind == "checkpoints":
            self._checkpoints_dirty = True
        else:
            self._texts.setdefault(*work)

    def _send_loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not (self._has_work() and time.monotonic() >= self._retry_at):
                    self._cv.wait(max(0.0, self._retry_at - time.monotonic()) if self._has_work() else None)
                if self._stopping:
                    return
                kind, work = self._take_work()
                self._busy = True
                self._in_flight = len(work) if kind == "metrics" else 0
            error = None
            try:
                self._send(kind, work)
            except Exception as e:  # every failure is handled below; the thread must outlive all of them
                error = e
            with self._cv:
                self._busy, self._in_flight = False, 0
                self._after_send(kind, work, error)
                self._cv.notify_all()

    def _after_send(self, kind: str, work, error: Exception | None) -> None:
        if error is None:
            if not self._online:
                log.warning("MLflow at %s reachable again; sending queued metrics", self._shown)
            self._online, self._backoff, self._retry_at = True, 0.0, 0.0
        elif is_permanent(error):
            if kind == "metrics":
                self.dropped += len(work)
            log.warning("MLflow rejected %s for run %s; dropped: %s", kind, self.run_id,
                        redact_value(str(error))[:300])
        else:
            if self._online:
                log.warning("MLflow at %s unreachable (%s); queuing and retrying in the background",
                            self._shown, redact_value(str(error))[:200])
            self._online = False
            self._give_back(kind, work)
            self._backoff = min(MAX_BACKOFF_S, max(1.0, 2 * self._backoff))
            self._retry_at = time.monotonic() + (FLUSH_RETRY_S if self._flushers else self._backoff)

    def _send(self, kind: str, work) -> None:
        from mlflow.entities import Metric, RunTag

        if self._client is None:
            self._client = connect(self._cfg, self._root)
        client = self._client
        if kind == "metrics":
            client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in work])
        elif kind == "tags":
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in work.items()])
        elif kind == "checkpoints":
            self._merge_remote_checkpoints(client)
            with self._cv:
                records = [self._checkpoints[s] for s in sorted(self._checkpoints)]
            client.log_text(self.run_id, json.dumps(records, indent=1), CHECKPOINTS_FILE)
        else:
            client.log_text(self.run_id, work[1], work[0])

    def _merge_remote_checkpoints(self, client) -> None:
        """After a restart this tracker knows only new checkpoints; keep the ones the run already lists."""
        if self._checkpoints_merged:
            return
        remote = []
        if any(f.path == CHECKPOINTS_FILE for f in client.list_artifacts(self.run_id)):
            with tempfile.TemporaryDirectory() as tmp:
                path = client.download_artifacts(self.run_id, CHECKPOINTS_FILE, tmp)
                try:
                    remote = json.loads(Path(path).read_text())
                except ValueError:
                    log.warning("%s of run %s is not valid JSON; rewriting it", CHECKPOINTS_FILE, self.run_id)
        with self._cv:
            for record in remote:
                self._checkpoints.setdefault(int(record["step"]), record)
            self._checkpoints_merged = True
