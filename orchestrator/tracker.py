"""Rank 0's MLflow tracker: the training loop only enqueues; a daemon thread sends, retrying through outages.

The sender thread also keeps the run's record whole: it reads what the run already holds once (so steps a
restart replays are not logged twice, and the loss curve covers the whole run), draws the loss curve at
each checkpoint and at the end, and marks checkpoints that pruning deleted in the checkpoint table.
"""

import json
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path

from orchestrator.redact import redact_value
from orchestrator.run_record import CURVE_KEYS, LOSS_CURVE_FILE, render_loss_curve
from orchestrator.schema import TrackingConfig
from orchestrator.tracking import (
    MAX_PARAMS_PER_BATCH,
    MAX_TAG_LENGTH,
    connect,
    is_permanent,
    log,
    redact_tags,
    safe_key,
    tracking_uri,
)

CHECKPOINTS_FILE = "checkpoints.json"  # run artifact: every checkpoint's step, URI, size and metrics
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch
MAX_BACKOFF_S = 30.0
FLUSH_RETRY_S = 0.5  # while someone waits in flush(), retry this often instead of backing off


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
        self._uris: dict[int, str] = {}  # step -> the checkpoint's real URI (the table holds it redacted)
        self._history: dict[str, dict[int, float]] = {key: {} for key in CURVE_KEYS}  # for the loss curve
        self._logged_steps: dict[str, int] | None = None  # per key, the highest step the run held at start
        self._curve_due = False
        self._system_due, self._system_monitor = cfg.system_metrics, None
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
                self._uris[record["step"]] = str(uri)
                self._checkpoints_dirty = self._curve_due = True
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
        with self._cv:  # the final loss curve
            self._curve_due = self._curve_due or any(self._history.values())
        drained = self.flush(timeout_s)
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout=1.0)  # it may be inside a request; as a daemon it cannot block exit
        if self._system_monitor is not None:
            self._system_monitor.finish()  # its last sample; it stops by itself once the run has ended
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
            for key, value, _, step in items:
                if key in self._history:
                    self._history[key][step] = value
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
        return bool(self._logged_steps is None or self._metrics or self._tags or self._texts
                    or self._checkpoints_dirty or self._curve_due or self._system_due)

    def _take_work(self) -> tuple[str, object]:
        """One unit of work, removed from the queues; _give_back puts it back if sending fails."""
        if self._logged_steps is None:  # first of all: what the run already holds
            return "history", None
        if self._system_due:
            self._system_due = False
            return "system", None
        if self._metrics:
            return "metrics", [self._metrics.popleft()
                               for _ in range(min(len(self._metrics), MAX_METRICS_PER_BATCH))]
        if self._tags:
            keys = list(self._tags)[:MAX_PARAMS_PER_BATCH]
            return "tags", {k: self._tags.pop(k) for k in keys}
        if self._checkpoints_dirty:
            self._checkpoints_dirty = False
            return "checkpoints", None
        if self._texts:
            artifact_file = next(iter(self._texts))
            return "text", (artifact_file, self._texts.pop(artifact_file))
        self._curve_due = False
        return "curve", {key: dict(points) for key, points in self._history.items()}

    def _give_back(self, kind: str, work) -> None:
        if kind == "metrics":
            self._metrics.extendleft(reversed(work))  # keeps order, and the trim drops the oldest
            self._trim()
        elif kind == "tags":
            self._tags = work | self._tags  # a newer value set meanwhile wins
        elif kind == "checkpoints":
            self._checkpoints_dirty = True
        elif kind == "text":
            self._texts.setdefault(*work)
        elif kind == "curve":
            self._curve_due = True
        elif kind == "system":
            self._system_due = True

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
            elif kind == "history":  # the run cannot be read, so there is nothing it already holds
                self._logged_steps = {}
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
        if kind == "history":
            self._read_history(client)
        elif kind == "system":
            self._start_system_metrics()
        elif kind == "metrics":
            logged = self._logged_steps
            # A restart replays the steps after its checkpoint; the run holds them already, with the same values.
            fresh = [Metric(k, v, ts, step) for k, v, ts, step in work if step > logged.get(k, -1)]
            if fresh:
                client.log_batch(self.run_id, metrics=fresh)
        elif kind == "tags":
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in work.items()])
        elif kind == "checkpoints":
            self._merge_remote_checkpoints(client)
            self._mark_deleted_checkpoints()
            with self._cv:
                records = [self._checkpoints[s] for s in sorted(self._checkpoints)]
            client.log_text(self.run_id, json.dumps(records, indent=1), CHECKPOINTS_FILE)
        elif kind == "text":
            client.log_text(self.run_id, work[1], work[0])
        else:
            self._log_curve(client, work)

    def _read_history(self, client) -> None:
        """Once, before anything is sent: the highest step of each metric the run holds (a restart's replayed
        steps are at or below it), and the loss history so far, for a curve of the whole run."""
        run = client.get_run(self.run_id)
        steps = {m.key: m.step for m in run.data.to_proto().metrics}  # each key's latest: its highest step
        earlier = {key: {m.step: m.value for m in client.get_metric_history(self.run_id, key)}
                   for key in CURVE_KEYS if key in steps}
        with self._cv:
            for key, points in earlier.items():
                self._history[key] = points | self._history[key]
            self._logged_steps = steps

    def _start_system_metrics(self) -> None:
        """MLflow's own CPU/memory/GPU sampling (tracking.system_metrics) into this run's system/* metrics,
        on a thread of MLflow's; it continues the run's earlier samples after a restart."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # It reads the run itself and treats an unreachable server as a run without samples.
            monitor = SystemMetricsMonitor(self.run_id, resume_logging=True,
                                           tracking_uri=tracking_uri(self._cfg, self._root))
            monitor.start()
        except Exception as error:  # not an outage (a missing psutil, say): retrying would not help
            log.warning("MLflow system metrics not started for run %s: %s", self.run_id, error)
            return
        self._system_monitor = monitor

    def _mark_deleted_checkpoints(self) -> None:
        """Mark listed checkpoints whose marker is gone (pruned by checkpoint.keep_last, or deleted by hand)
        as deleted, with when this was noticed. A storage that cannot be read leaves them as they were."""
        import fsspec

        from orchestrator.checkpoint import MARKER

        with self._cv:
            newest = max(self._uris, default=None)  # committed a moment ago by this rank: no need to look
            listed = {s: self._uris.get(s, r["uri"]) for s, r in self._checkpoints.items()
                      if not r.get("deleted") and s != newest}
        gone = []
        for step, uri in listed.items():
            try:
                fs, root = fsspec.core.url_to_fs(uri)
                fs.invalidate_cache(root)  # pruned by this process a moment ago; a cached listing is stale
                if not fs.exists(f"{root.rstrip('/')}/{MARKER}"):
                    gone.append(step)
            except Exception as error:
                log.debug("cannot tell whether checkpoint %s still exists: %s", redact_value(uri), error)
        now = int(time.time() * 1000)
        with self._cv:
            for step in gone:
                self._checkpoints[step] = self._checkpoints[step] | {"deleted": True, "deleted_at": now}

    def _log_curve(self, client, history: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/{LOSS_CURVE_FILE}"
            try:
                drawn = render_loss_curve(history, path, title=f"run {self.run_id}")
            except Exception as error:  # drawing again would fail again; only an upload is worth retrying
                log.warning("could not draw %s for run %s: %s", LOSS_CURVE_FILE, self.run_id, error)
                return
            if drawn:
                client.log_artifact(self.run_id, path)

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
