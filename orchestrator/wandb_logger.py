"""Weights & Biases as a second logger beside MLflow, held by rank 0: the same metrics, config and run name.

MLflow stays the system of record. Nothing wandb does may stop training, so every call is guarded: the first
failure becomes one warning line and turns the logger off for the rest of the run.
"""

import logging
import os
import re
from collections.abc import Mapping

from orchestrator.redact import redact_config, redact_value
from orchestrator.schema import WandbConfig
from orchestrator.tracking import flatten_params

log = logging.getLogger("lmforge.wandb")

# Seconds wandb.init may wait for the W&B server; wandb's own default (90 s) would hold rank 0, and with it
# every other rank at its next collective, for a minute and a half on a machine without network.
INIT_TIMEOUT_S = 30


def wandb_run_id(run_key: str) -> str:
    """A W&B run id from the MLflow run id (or the run name): the same for every attempt and resume of one
    run, so a restarted worker continues the W&B run instead of starting another. W&B takes up to 64
    letters, digits, '-' and '_'."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", run_key)[:64]


class WandbLogger:
    """start(), log() per reported step, finish(): rank 0 calls these next to its MLflow RunTracker."""

    def __init__(self, cfg: WandbConfig, directory: str):
        self.enabled = cfg.enabled
        self._cfg = cfg
        # wandb writes <directory>/wandb/<run>/; WANDB_DIR, when a user set it, wins as it does for wandb.
        self._dir = os.environ.get("WANDB_DIR") or directory
        self._run = None
        self.run_dir: str | None = None  # the local W&B run directory, the one `wandb sync` uploads

    def start(self, run_name: str, config: Mapping, run_key: str | None = None) -> None:
        """Open (or resume) the W&B run. `config` is the resolved config; only its redacted, flattened form
        is sent. `run_key` is the MLflow run id when there is one, else the run name is the key."""
        if not self.enabled:
            return
        try:
            import wandb

            os.makedirs(self._dir, exist_ok=True)
            self._run = wandb.init(
                project=self._cfg.project, entity=self._cfg.entity, mode=self._cfg.mode, name=run_name,
                id=wandb_run_id(run_key or run_name), resume="allow", dir=self._dir,
                config=redact_config(flatten_params(config)),
                # console="off": the worker's output stays Ray's; silent: no banner at the driver's console.
                settings=wandb.Settings(silent=True, console="off", init_timeout=INIT_TIMEOUT_S))
            self.run_dir = os.path.dirname(self._run.dir)  # run.dir is the run's files/ folder
        except Exception as error:  # wandb.init raises its own errors, and any OSError of the directory
            self._disable("start a run", error)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self._run is None:
            return
        try:
            # W&B's step only goes forward: after a restart from a checkpoint, the replayed steps are already
            # in a resumed run, and logging them again would only print W&B's warning.
            if step < self._run.step:
                return
            self._run.log(dict(metrics), step=int(step))
        except Exception as error:
            self._disable("log metrics", error)

    def finish(self, exit_code: int = 0) -> None:
        """Close the run; a non-zero `exit_code` marks it failed in W&B."""
        if self._run is None:
            return
        run, self._run = self._run, None
        try:
            run.finish(exit_code=exit_code)
        except Exception as error:
            self._disable("finish its run", error)

    def _disable(self, action: str, error: Exception) -> None:
        log.warning("W&B could not %s (%s: %s); W&B logging is off for this run, MLflow goes on", action,
                    type(error).__name__, redact_value(str(error)).splitlines()[0][:300] if str(error) else "")
        self.enabled = False
        run, self._run = self._run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # already reported above; a half-dead run may refuse this too
                log.debug("W&B run could not be closed after the failure", exc_info=True)
