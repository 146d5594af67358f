"""Model selection: which checkpoint is best by a validation metric, and when a run stops early.

The state (best value and step, evaluations since the last improvement) is saved in every checkpoint's
marker, so a resumed run stops at the same step an uninterrupted one would. An evaluation that improves
the metric also saves a checkpoint (with checkpoint.keep_best), so the best model always exists on storage;
pruning spares it, and `lmforge export --best` reads its step from the newest marker.
"""

import math
from dataclasses import asdict, dataclass

from common.errors import LmforgeError


@dataclass
class Selection:
    metric: str
    mode: str  # min or max
    patience: int = 0  # 0: never stop early
    min_delta: float = 0.0
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the best one

    @classmethod
    def for_run(cls, cfg, objective_class) -> "Selection":
        tr = cfg.trainer
        metric = tr.monitor or objective_class.selection_metric
        mode = tr.monitor_mode or (objective_class.selection_mode if metric == objective_class.selection_metric
                                   else "max" if _higher_is_better(metric) else "min")
        return cls(metric, mode, tr.early_stopping_patience, tr.early_stopping_min_delta)

    def update(self, metrics: dict, step: int) -> bool:
        """Record one evaluation; True when it is the best so far."""
        if self.metric not in metrics:
            measured = ", ".join(sorted(k for k in metrics if k.startswith("val/")))
            raise LmforgeError(f"trainer.monitor={self.metric} is not a metric this objective reports; "
                               f"it reports {measured}")
        value = float(metrics[self.metric])
        sign = 1.0 if self.mode == "max" else -1.0
        improved = math.isfinite(value) and (self.best is None or sign * (value - self.best) > self.min_delta)
        if improved:
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience

    def stop_message(self, step: int) -> str:
        return (f"early stopping at step {step}: {self.metric} has not improved for {self.bad_evals} evaluations "
                f"(best {self.best:.4g} at step {self.best_step})")

    def state(self) -> dict:
        return asdict(self)

    def load(self, state: dict | None) -> None:
        """Continue from a checkpoint's state when it watched the same metric the same way."""
        if state and state.get("metric") == self.metric and state.get("mode") == self.mode:
            self.best, self.best_step, self.bad_evals = state["best"], state["best_step"], state["bad_evals"]


def _higher_is_better(metric: str) -> bool:
    name = metric.rsplit("/", 1)[-1]
    return not any(word in name for word in ("loss", "perplexity", "error"))


def best_checkpoint(run_dir: str, checksums: bool = False) -> tuple[str, dict]:
    """(uri, selection state) of a run's best checkpoint, as its newest checkpoint's marker records it."""
    from orchestrator import checkpoint

    found = checkpoint.scan(run_dir, checksums)
    if not found.complete:
        raise LmforgeError(f"{run_dir} has no complete checkpoint yet")
    newest = checkpoint.read_marker(found.latest())
    state = newest.get("selection") or {}
    if state.get("best_step") is None:
        raise LmforgeError(f"{run_dir} has no best checkpoint: no evaluation was recorded with checkpoint.keep_best")
    for step, uri in found.complete:
        if step == state["best_step"]:
            return uri, state
    raise LmforgeError(f"the best checkpoint of {run_dir} (step {state['best_step']}, {state['metric']}="
                       f"{state['best']:.4g}) is not in storage: it was pruned, or never saved because "
                       f"checkpoint.keep_best was off (the default for pretraining)")
