"""Driver side of `lmforge sweep`: Hydra sweep expressions searched by Ray Tune, each trial a full lmforge
training run (its own DeepSpeed workers, checkpoints and MLflow child run), scheduled by ASHA."""

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from common.errors import ConfigError, LmforgeError
from orchestrator import checkpoint, runs
from orchestrator.schema import LmforgeConfig
from orchestrator.sweep_space import (
    Swept,
    check_trials,
    describe,
    is_sweep_setting,
    mark_integers,
    merge,
    parse_expressions,
    split_overrides,
    trial_overrides,
    tune_space,
)

SWEEP_INFO = "lmforge_sweep.json"
CONSOLE_EVERY_S = 15.0  # the running table is redrawn on a trial's start or end, else at most this often


@dataclass
class Sweep:
    """Everything a trial needs from the driver; saved in the sweep directory so a resume rebuilds it."""
    name: str
    sweep_dir: str  # Tune's experiment directory
    root: str  # paths.root
    fixed: list[str]  # the command line's ordinary overrides (sweep.* settings included)
    expressions: list[str]  # every swept key's expression, preset's and command line's
    parent_run_id: str | None
    prepared: str | None  # data prepared once by the driver; None when a trial's data depends on its values
    worker_env: dict

    def save(self) -> None:
        Path(self.sweep_dir).mkdir(parents=True, exist_ok=True)
        saved = {k: v for k, v in dataclasses.asdict(self).items() if k != "worker_env"}
        (Path(self.sweep_dir) / SWEEP_INFO).write_text(json.dumps(saved, indent=1))

    @classmethod
    def load(cls, sweep_dir: str, worker_env: dict) -> "Sweep":
        info_file = Path(sweep_dir) / SWEEP_INFO
        if not info_file.is_file():
            raise LmforgeError(f"resume={sweep_dir}: not an lmforge sweep directory (no {SWEEP_INFO})")
        return cls(**json.loads(info_file.read_text()) | {"sweep_dir": str(Path(sweep_dir).resolve()),
                                                         "worker_env": worker_env})


@dataclass
class Plan:
    cfg: LmforgeConfig  # the base config: ordinary overrides and sweep settings, no swept value
    swept: list[Swept]
    checked: int  # trial configs validated before the start


def plan(overrides: list[str]) -> tuple[list[str], Plan]:
    """(the ordinary overrides, the plan): parse and check everything a sweep needs before any trial starts."""
    from orchestrator.config import group_options, load_config

    fixed, given = split_overrides(overrides)
    for preset in (o.split("=", 1)[1] for o in fixed if o.lstrip("+").split("=", 1)[0] == "sweep"):
        if preset not in group_options("sweep"):
            raise ConfigError(f"sweep={preset}: unknown sweep preset; choose one of: "
                              f"{', '.join(group_options('sweep'))}")
    cfg = load_config(fixed)
    swept = merge(parse_expressions(cfg.sweep.params, f"sweep={cfg.sweep.name} (sweep.params)"), given)
    if not swept:
        raise ConfigError("nothing to sweep: give sweep expressions such as trainer.lr=tag(log,interval(1e-4,"
                          "1e-2)) or model.n_layer=choice(1,2), or a preset with sweep=<name>")
    if any(is_sweep_setting(s.key) for s in swept):
        raise ConfigError(f"{next(s.expression for s in swept if is_sweep_setting(s.key))}: sweep.* settings "
                          "shape the search and cannot themselves be swept")
    mark_integers(swept, cfg)
    tune_space(swept, cfg.sweep.search)  # a grid over an interval fails here, before the configs are composed
    return fixed, Plan(cfg, swept, check_trials(fixed, swept))


def shared_data(fixed: list[str], swept: list[Swept]) -> bool:
    """Whether every trial trains on the same prepared data, so the driver prepares it once."""
    from orchestrator.config import load_config
    from orchestrator.launcher import prepared_location

    kept = [o for o in fixed if not is_sweep_setting(o)]
    corner_values = [{s.key: value} for s in swept for value in s.corners()]
    locations = {prepared_location(load_config(trial_overrides(kept, values))) for values in corner_values}
    return len(locations) == 1


def run_sweep(overrides: list[str], address: str | None = None, worker_env: dict | None = None):
    """Start a sweep (or continue one with resume=<sweep dir>) and return its summary (sweep_results)."""
    from orchestrator.config import load_config

    resume_dir = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "resume"), None)
    if resume_dir is not None:
        others = [o for o in overrides if o.split("=", 1)[0] != "resume"]
        if others:
            raise ConfigError(f"resume={resume_dir} continues a sweep as it was configured; drop "
                              f"{' '.join(others)}")
        sweep = Sweep.load(resume_dir, worker_env or {})
        fixed, swept = sweep.fixed, parse_expressions(sweep.expressions, f"{resume_dir}/{SWEEP_INFO}")
        cfg = load_config(fixed + [f"paths.root={sweep.root}"])
        mark_integers(swept, cfg)
        return execute(cfg, swept, sweep, address, restore=True)

    fixed, checked = plan(overrides)
    cfg, swept = checked.cfg, checked.swept
    name = sweep_name(cfg)
    sweep_dir = f"{cfg.paths.root}/sweeps/{name}"
    if Path(sweep_dir).exists():
        raise LmforgeError(f"sweep {name} already exists in {sweep_dir}; pass resume={sweep_dir} to continue it")
    from orchestrator.progress import say

    say(f"sweep {name}: {describe(swept)}; {checked.checked} trial config(s) checked")
    prepared = None
    if shared_data(fixed, swept):
        from orchestrator.launcher import prepare_data

        prepared = str(prepare_data(cfg))
    sweep = Sweep(name, sweep_dir, cfg.paths.root, fixed, [s.expression for s in swept], None, prepared,
                  worker_env or {})
    return execute(cfg, swept, sweep, address, restore=False)


def sweep_name(cfg: LmforgeConfig) -> str:
    return cfg.run_name or f"sweep-{cfg.model.name}-{cfg.objective.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def execute(cfg: LmforgeConfig, swept: list[Swept], sweep: Sweep, address: str | None, restore: bool):
    import ray
    from ray import tune

    from orchestrator import sweep_results
    from orchestrator.tracking import finish_run, start_run

    per_trial = cfg.hardware.workers * cfg.hardware.cpus_per_worker + cfg.sweep.driver_cpus
    concurrency = cfg.sweep.max_concurrent_trials or max(1, math.floor((os.cpu_count() or 1) / per_trial))
    started_here = start_ray(cfg, address, sweep.worker_env, concurrency * per_trial)
    if not cfg.sweep.max_concurrent_trials and not started_here:
        concurrency = max(1, math.floor(ray.cluster_resources().get("CPU", 1) / per_trial))
    params = {"sweep.params": sweep.expressions, "sweep.fixed": sweep.fixed} | {
        f"sweep.{k}": v for k, v in dataclasses.asdict(cfg.sweep).items() if k != "params"}
    sweep.parent_run_id = start_run(cfg.tracking, cfg.paths.root, sweep.name, params=params,
                                    tags={"lmforge.sweep_dir": sweep.sweep_dir, "lmforge.kind": "sweep"},
                                    run_id=sweep.parent_run_id)
    sweep.save()
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep),
                                    {"cpu": cfg.sweep.driver_cpus})
    console = ConsoleTable(cfg.sweep.metric, cfg.trainer.max_steps)
    try:
        if restore:
            if not tune.Tuner.can_restore(sweep.sweep_dir):
                raise LmforgeError(f"resume={sweep.sweep_dir}: Tune saved no state there yet (the sweep was "
                                   "stopped before its first trial started); start it again instead")
            tuner = tune.Tuner.restore(sweep.sweep_dir, trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(trainable, param_space=tune_space(swept, cfg.sweep.search),
                               tune_config=tune_config(cfg, concurrency),
                               run_config=run_config(cfg, sweep, console))
        results = tuner.fit()
    except KeyboardInterrupt:
        finish_run(cfg.tracking, cfg.paths.root, sweep.parent_run_id, "KILLED")
        raise
    except BaseException:
        finish_run(cfg.tracking, cfg.paths.root, sweep.parent_run_id, "FAILED")
        raise
    finally:
        if started_here:
            ray.shutdown()
        else:
            release_trial_resources()
    summary = sweep_results.summarize(cfg, sweep, swept, results)
    finish_run(cfg.tracking, cfg.paths.root, sweep.parent_run_id, "FINISHED" if summary.best else "FAILED")
    return summary


def start_ray(cfg: LmforgeConfig, address: str | None, worker_env: dict, cpus_needed: float) -> bool:
    """Join the given cluster, or start an embedded one that holds every concurrent trial's workers and
    driver (launcher.connect sizes a cluster for one run's workers; here it is sized for `cpus_needed`).
    On a small machine this oversubscribes the cores on purpose: the trials then share them."""
    from orchestrator.launcher import connect

    sized = dataclasses.replace(cfg, hardware=dataclasses.replace(
        cfg.hardware, workers=1, cpus_per_worker=max(1.0, math.ceil(cpus_needed) - 1.0)))
    # Tune saves the sweep's state this often (seconds), which bounds what an interrupted driver forgets:
    # a trial finished since the last save would run again on resume.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    return connect(address, sized, worker_env)


def tune_config(cfg: LmforgeConfig, concurrency: int):
    from ray import tune

    sw = cfg.sweep
    search_alg = None
    if sw.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=cfg.seed)  # TPE, Optuna's default sampler; metric and mode come below
    scheduler = None
    if sw.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        max_t = cfg.trainer.max_steps
        # time_attr="step": a rung is a trainer step, whatever the number of reports before it.
        scheduler = ASHAScheduler(time_attr="step", max_t=max_t, reduction_factor=sw.reduction_factor,
                                  grace_period=min(max_t, sw.grace_period or cfg.trainer.eval_every or max_t))
    return tune.TuneConfig(metric=sw.metric, mode=sw.mode, search_alg=search_alg, scheduler=scheduler,
                           num_samples=sw.num_samples, max_concurrent_trials=concurrency,
                           trial_dirname_creator=lambda trial: trial.trial_id)


def run_config(cfg: LmforgeConfig, sweep: Sweep, console):
    from ray import tune

    return tune.RunConfig(name=sweep.name, storage_path=str(Path(sweep.sweep_dir).parent),
                          failure_config=tune.FailureConfig(max_failures=cfg.sweep.max_failures),
                          callbacks=[console, PlacementGroupReaper()], verbose=0)


def trial_run_dir(cfg: LmforgeConfig, sweep_name: str, trial_id: str) -> str:
    return f"{runs.storage_root(cfg)}/{sweep_name}-{trial_id}"


def run_trial(values: dict, sweep: Sweep) -> None:
    """A Tune trial: one lmforge training run with the trial's values, reporting each evaluation to Tune.

    A retried or restored trial finds its run directory and continues from its newest checkpoint and in its
    own MLflow child run."""
    from ray import tune

    from orchestrator.config import load_config, to_dict
    from orchestrator.launcher import make_trainer, prepare_data
    from orchestrator.redact import redact_config
    from orchestrator.tracking import finish_run, start_run

    trial_id = tune.get_context().get_trial_id()
    kept = [o for o in sweep.fixed if not is_sweep_setting(o)]
    name = f"{sweep.name}-{trial_id}"
    cfg = load_config(trial_overrides(kept, values) + [f"paths.root={sweep.root}", f"run_name={name}"])
    run_dir = trial_run_dir(cfg, sweep.name, trial_id)
    before = runs.read_run_info(run_dir)
    prepared = sweep.prepared or str(prepare_data(cfg))
    config_dict = to_dict(cfg)
    tags = {"lmforge.run_dir": run_dir, "lmforge.prepared_data": prepared, "lmforge.sweep": sweep.name,
            "lmforge.sweep_trial": trial_id, "mlflow.parentRunId": sweep.parent_run_id or ""}
    run_id = start_run(cfg.tracking, cfg.paths.root, name, params=config_dict, tags=tags,
                       run_id=before["mlflow_run_id"] if before else None)
    runs.write_run_info(run_dir, {"run_name": name, "mlflow_run_id": run_id, "config": redact_config(config_dict),
                                  "prepared": prepared, "sweep": sweep.name, "trial_id": trial_id,
                                  "values": values})
    latest = checkpoint.latest_checkpoint(run_dir)
    if latest is not None and checkpoint.step_of(latest) >= cfg.trainer.max_steps:
        # Its driver was interrupted after the last checkpoint but before Tune heard the end: report what
        # that checkpoint recorded instead of starting workers with nothing left to train.
        marker = checkpoint.read_marker(latest)
        tune.report({"step": marker["step"], **marker["metrics"]})
        finish_run(cfg.tracking, cfg.paths.root, run_id, "FINISHED")
        return
    checkpoint.drop_ray_snapshot(run_dir)
    trainer = make_trainer(cfg, config_dict, embedded_cluster(), prepared, run_id, run_dir,
                           latest, sweep.worker_env,
                           callbacks=[MetricReportCallback(cfg.sweep.metric)])
    try:
        trainer.fit()
    except BaseException:
        finish_run(cfg.tracking, cfg.paths.root, run_id, "FAILED")
        raise
    finish_run(cfg.tracking, cfg.paths.root, run_id, "FINISHED")


def embedded_cluster() -> bool:
    """Whether this trial runs on a cluster lmforge started on loopback (launcher.connect's settings)."""
    from common.raynet import LOOPBACK_ONLY_ENV

    return all(os.environ.get(k) == v for k, v in LOOPBACK_ONLY_ENV.items()) and not os.environ.get("RAY_ADDRESS")


def remove_orphaned_placement_groups() -> int:
    """Remove the placement groups of this sweep's Train controllers that have died; returns how many.

    When ASHA stops a trial, Tune ends the trial's actor; the trial's Train controller and its workers die
    with it, but the workers' placement group lives as long as the job that created it (the sweep), so its
    CPUs would stay reserved and later trials could not start. Ray Train's own cleaner asks the State API,
    which needs the dashboard and cannot tell several clusters on one machine apart; the GCS's table says
    directly which groups' creating actor is dead. Only this job's, non-detached groups are touched."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = 0
    for group in actor_placement_groups():
        if group.creator_actor_dead:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(group.placement_group_id)))
            removed += 1
    return removed


def actor_placement_groups() -> list:
    """This job's live, non-detached placement groups that an actor (a Train controller) created."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    job, found = ray.get_runtime_context().get_job_id(), []
    for raw in state._connect_and_get_accessor().get_placement_group_table():  # no public API has the creator
        group = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if (group.creator_job_id.hex() == job and not group.is_detached
                and group.state != gcs_pb2.PlacementGroupTableData.REMOVED
                and not ray.ActorID(group.creator_actor_id).is_nil()):
            found.append(group)
    return found


def release_trial_resources(timeout_s: float = 60.0) -> None:
    """After the sweep, on a cluster that lives on: wait for the actors of trials stopped last to exit, and
    remove their workers' placement groups."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        remove_orphaned_placement_groups()
        if not actor_placement_groups():
            return
        time.sleep(1.0)


class PlacementGroupReaper(Callback):
    """Runs remove_orphaned_placement_groups as trials end, and every few seconds while trials run (a trial's
    actor exits a little after Tune marks it stopped)."""

    def __init__(self, every_s: float = 2.0):
        self.every_s, self.checked_at = every_s, 0.0

    def on_step(self, iteration, trials, **info):
        if time.monotonic() - self.checked_at >= self.every_s:
            self.checked_at = time.monotonic()
            remove_orphaned_placement_groups()

    def on_trial_complete(self, iteration, trials, trial, **info):
        remove_orphaned_placement_groups()

    on_trial_error = on_trial_complete


class MetricReportCallback(TuneReportCallback):
    """Tune's report callback (rank 0's ray.train.report metrics to Tune), for the reports that carry the
    sweep's metric: a checkpoint saved between evaluations reports none, and Tune refuses a result without
    the metric its scheduler and search use."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


class ConsoleTable(Callback):
    """The trials' state, latest step and metric on the console while the sweep runs."""

    def __init__(self, metric: str, max_steps: int):
        self.metric, self.max_steps = metric, max_steps
        self.rows: dict[str, dict] = {}
        self.drawn_at = 0.0

    def update(self, trial, state: str, result: dict | None = None, force: bool = True) -> None:
        row = self.rows.setdefault(trial.trial_id, {"step": 0, "metric": None})
        row["state"] = state
        if result and "step" in result:
            row["step"], row["metric"] = result["step"], result.get(self.metric, row["metric"])
        if force or time.monotonic() - self.drawn_at >= CONSOLE_EVERY_S:
            self.draw()

    def draw(self) -> None:
        self.drawn_at = time.monotonic()
        lines = [f"{'trial':<14} {'state':<13} {'step':>9} {self.metric:>12}"]
        for trial_id, row in sorted(self.rows.items()):
            value = "-" if row["metric"] is None else f"{row['metric']:.4g}"
            lines.append(f"{trial_id:<14} {row['state']:<13} {row['step']:>4}/{self.max_steps:<4} {value:>12}")
        print("\n".join(lines), flush=True, file=sys.stdout)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.update(trial, "running")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.update(trial, "running", result, force=False)

    def on_trial_complete(self, iteration, trials, trial, **info):
        step = self.rows.get(trial.trial_id, {}).get("step", 0)
        self.update(trial, "finished" if step >= self.max_steps else "stopped early", trial.last_result)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.update(trial, "error")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.update(trial, "retrying")
