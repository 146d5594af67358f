"""Driver side of `lmforge train`: prepare data once, start or join Ray, run TorchTrainer, track the run."""

import contextlib
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from common.errors import LmforgeError
from common.raynet import use_loopback_only
from data.prepared import prepare_training_data
from orchestrator import checkpoint, resume, runs
from orchestrator.checkpoint import latest_checkpoint
from orchestrator.config import to_dict
from orchestrator.failures import failure_policy, worker_user_error
from orchestrator.redact import redact_config, redact_value
from orchestrator.schema import LmforgeConfig

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent
# An embedded cluster shares the workers' cores, so it leaves out what only a long-lived shared cluster
# uses: Prometheus metrics that nothing scrapes here, and the cloud-preemption watcher actor. Measured on
# 2 cores with 2 workers, this gave the workers a few percent more throughput (bench/RESULTS.md).
LOCAL_CLUSTER_ENV = {"RAY_enable_metrics_collection": "0", "RAY_TRAIN_METRICS_ENABLED": "0",
                     "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
SHIPPED_EXCLUDES = [".venv/", ".git/", "lmforge_runs/", "bench/", "tests/", "**/__pycache__/", "*.db"]


@dataclass
class TrainResult:
    run_name: str
    run_dir: str
    mlflow_run_id: str | None
    metrics: dict
    checkpoint: str | None
    seconds_to_first_step: float | None  # from the start of train()
    startup: dict[str, float]  # seconds spent in each start-up phase before the first step
    started_at: float  # wall-clock time train() began
    already_done: str | None = None  # a resume of a run that had reached trainer.max_steps: nothing ran


def connect(address: str | None, cfg: LmforgeConfig, worker_env: dict[str, str]) -> bool:
    """Join the cluster at `address` or RAY_ADDRESS, else start an embedded one; True if it was started here."""
    import psutil
    import ray
    from ray._raylet import Config

    if ray.is_initialized():  # an embedding program (a test, a notebook) already chose the cluster
        return False
    verbose = os.environ.get("LMFORGE_VERBOSE") == "1"
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": worker_env}
    if address:
        # Ray turns token authentication on by itself only for a cluster it finds, never for a named address.
        if os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_MODE"):
            os.environ["RAY_AUTH_MODE"] = "token"
            Config.initialize("")  # Ray read its settings when it was imported; read RAY_AUTH_MODE again
        if address.rpartition("://")[2].rpartition(":")[0].strip("[]") in ("127.0.0.1", "localhost", "::1"):
            # A head on loopback (cluster/start-head.sh's default): otherwise Ray dials this machine's routable
            # address instead, where nothing listens.
            use_loopback_only()
        # A remote cluster gets this checkout as the job's working directory; the packages are top-level.
        # A Ray job (lmforge submit) already runs in the code it shipped, which Ray gives its workers too.
        if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
            runtime_env |= {"working_dir": str(REPO_ROOT), "excludes": SHIPPED_EXCLUDES}
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=verbose,
                 logging_level="INFO" if verbose else "ERROR")
        return False
    cpus = max(os.cpu_count() or 1, int(cfg.hardware.workers * cfg.hardware.cpus_per_worker) + 1)
    # A local cluster's workers inherit this process's environment; a runtime_env would only make Ray start
    # fresh worker processes through its runtime-env agent instead of the ones it pre-starts.
    os.environ.update(worker_env)
    for key, value in LOCAL_CLUSTER_ENV.items():
        os.environ.setdefault(key, value)
    use_loopback_only()
    if "lo" in psutil.net_if_addrs():  # Linux: gloo would listen on the address the host name resolves to
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ray.init(num_cpus=cpus, dashboard_host="127.0.0.1", include_dashboard=cfg.hardware.ray_dashboard,
             log_to_driver=verbose, logging_level="INFO" if verbose else "ERROR", _temp_dir=ray_temp_dir(cfg))
    return True


def start_autoscaling_coordinator() -> None:
    """Start the autoscaling-coordinator actor now, while the MLflow run is still being created.

    Ray Train's controller gets or creates this named actor and waits for it before it places any worker;
    left to the controller, its start sat on the critical path of a cold start (about 1.3 s on 2 cores).
    Started from the driver it also takes a worker process Ray pre-started instead of leaving it idle.
    """
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        get_or_create_autoscaling_coordinator()
    except Exception as error:  # another Ray version: the controller starts its own, as before
        log.debug("not starting Ray Train's autoscaling coordinator early: %s", error)


def worker_runtime_env(worker_env: dict[str, str]) -> dict | None:
    """Only what the workers would not inherit anyway: each runtime env costs a worker-process start."""
    missing = {k: v for k, v in worker_env.items() if os.environ.get(k) != v}
    return {"env_vars": missing} if missing else None


def ray_temp_dir(cfg: LmforgeConfig) -> str | None:
    """Ray's session files under the output root, when the path is short enough for Ray's Unix sockets.

    Ray puts sockets at <temp>/session_<timestamp>_<pid>/sockets/plasma_store (about 62 characters past the
    temp dir), and Unix socket paths are limited to 107 bytes; a deeper root keeps Ray's default /tmp/ray.
    """
    temp = f"{cfg.paths.root}/ray"
    return temp if len(temp) <= 45 else None


def train(cfg: LmforgeConfig, overrides: list[str], address: str | None = None,
          worker_env: dict[str, str] | None = None) -> TrainResult:
    from orchestrator.progress import say
    from orchestrator.registry import register_final_model
    from orchestrator.tracking import finish_run

    wall_started = time.time()
    # Ray Train's torch side imports torch (about 2 s on a small machine); that overlaps preparing data and
    # starting Ray and the MLflow run, which mostly wait on other processes.
    trainer_modules = threading.Thread(target=import_trainer_modules, daemon=True)
    trainer_modules.start()
    if cfg.resume:
        plan = resume.plan(cfg, overrides)
        cfg, run_name, run_dir = plan.cfg, plan.run_name, plan.run_dir
        for uri, why in plan.rejected:  # no worker runs yet, so nothing is mid-save: remove them for good
            say(f"{checkpoint.skipped_line(uri, why)}; removed")
            checkpoint.remove(uri)
        if plan.parent:
            say(f"{plan.checkpoint} is older than its run's newest checkpoint: continuing it as the new run "
                f"{run_name}; {plan.parent['run_dir']} stays as it was")
        if plan.step >= cfg.trainer.max_steps:
            return TrainResult(run_name, run_dir, plan.mlflow_run_id, {}, plan.checkpoint, None, {}, wall_started,
                               already_done=f"reached step {plan.step} of trainer.max_steps="
                                            f"{cfg.trainer.max_steps} already")
        if plan.checkpoint and checkpoint.read_marker(plan.checkpoint).get("stopped_early"):
            return TrainResult(run_name, run_dir, plan.mlflow_run_id, {}, plan.checkpoint, None, {}, wall_started,
                               already_done=f"stopped early at step {plan.step} (trainer.early_stopping_patience)")
    else:
        plan, run_name = None, cfg.run_name or runs.default_run_name(cfg)
        run_dir = f"{runs.storage_root(cfg)}/{run_name}"
        if runs.read_run_info(run_dir) is not None:
            raise LmforgeError(f"run {run_name} already exists in {run_dir}; pass resume={run_dir} to continue it")

    marks = {"start": wall_started}
    prepared = str(prepare_data(cfg))
    if plan is not None and plan.checkpoint:
        check_resumable_data(plan, prepared, cfg, overrides)
    marks["data_prepared"] = time.time()
    checkpoint.drop_ray_snapshot(run_dir)
    config_dict = to_dict(cfg)
    mlflow_run_id, status_before, embedded = start_tracking_and_ray(cfg, plan, run_name, run_dir, prepared,
                                                                    config_dict, address, worker_env or {},
                                                                    overrides)
    trainer_modules.join()
    info = {"run_name": run_name, "mlflow_run_id": mlflow_run_id, "config": redact_config(config_dict),
            "prepared": prepared} | ({"parent": plan.parent} if plan and plan.parent else {})
    runs.write_run_info(run_dir, info)
    marks["ray_and_tracking_ready"] = time.time()
    try:
        with stop_signals_interrupt():
            metrics = fit(cfg, config_dict, embedded, prepared, mlflow_run_id, run_dir, plan, worker_env or {})
    except KeyboardInterrupt:  # Ctrl-C or `lmforge stop`: the checkpoints stay resumable; the run is killed
        finish_run(cfg.tracking, cfg.paths.root, mlflow_run_id, "KILLED")
        raise
    except BaseException:
        end_failed(cfg, mlflow_run_id, status_before, trained=False)
        raise
    first_step = metrics.pop("first_step_at", None)
    startup = startup_phases(marks | metrics.pop("worker_startup", {}), first_step)
    failed, error = metrics.pop("failed", None), metrics.pop("error", None)
    if error is not None or failed:
        end_failed(cfg, mlflow_run_id, status_before, trained=first_step is not None)
        if failed:
            raise LmforgeError(f"training failed: {failed}")
        raise LmforgeError(f"training failed: {worker_user_error(error) or error}") from error
    final = latest_checkpoint(run_dir)
    register_final_model(cfg, mlflow_run_id, run_dir, final, metrics)  # never raises: a warning at worst
    finish_run(cfg.tracking, cfg.paths.root, mlflow_run_id, "FINISHED")
    return TrainResult(run_name, run_dir, mlflow_run_id, metrics, final,
                       first_step - wall_started if first_step else None, startup, wall_started)


@contextlib.contextmanager
def stop_signals_interrupt():
    """While the workers train, SIGTERM (how `lmforge stop` and `ray job stop` end a job's driver) is Ctrl-C,
    so the run ends KILLED with its checkpoints resumable, not FAILED through the SystemExit of Ray's own
    handler. A job's driver also inherits SIGINT ignored. Off the main thread (an embedding program) signals
    cannot be set and stay as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, interrupt)
    if before[signal.SIGINT] == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def sample_spec(cfg: LmforgeConfig):
    """How documents become samples for this run's objective."""
    from model.objectives import get_objective

    return get_objective(cfg.objective.name).sample_spec(cfg.objective)


def samples_wanted(cfg: LmforgeConfig) -> dict:
    """What the prepared data is built to: a pretraining objective's sample spec, or a fine-tuning task's
    samples from labelled records (data.finetune)."""
    from model.objectives import get_objective
    from model.tasks import is_task

    objective = get_objective(cfg.objective.name)
    if is_task(objective):
        return {"task": objective, "task_cfg": cfg.objective}
    return {"spec": sample_spec(cfg)}


def prepared_location(cfg: LmforgeConfig) -> Path:
    from data.prepared import prepared_path, task_key

    wanted = samples_wanted(cfg)
    return prepared_path(cfg.data, cfg.paths.root, cfg.seed, wanted.get("spec"),
                         task_key(wanted.get("task"), wanted.get("task_cfg")))


def prepare_data(cfg: LmforgeConfig, **options) -> Path:
    """The run's prepared data, built to its objective's samples (see data.prepared.prepare_training_data)."""
    return prepare_training_data(cfg.data, cfg.paths.root, cfg.seed, **samples_wanted(cfg), **options)


def check_resumable_data(plan: resume.Resume, prepared: str, cfg: LmforgeConfig, overrides: list[str]) -> None:
    """Refuse before anything starts, rather than on the workers, where the check repeats for restarts."""
    checkpoint.check_same_data(checkpoint.read_marker(plan.checkpoint)["loader"],
                               checkpoint.data_identity(prepared, cfg.data.shuffle), plan.checkpoint,
                               resume.data_keys_given(resume.given_keys(overrides)))


def start_tracking_and_ray(cfg: LmforgeConfig, plan, run_name: str, run_dir: str, prepared: str,
                           config_dict: dict, address: str | None, worker_env: dict[str, str],
                           overrides: list[str] = ()):
    """(MLflow run id, its status before this start, whether Ray was started here). Creating a fresh MLflow
    store takes seconds, so it overlaps Ray's start-up; if Ray cannot start, the run is not left RUNNING."""
    from orchestrator.run_record import job_tags
    from orchestrator.tracking import run_status, start_run

    run_id = plan.mlflow_run_id if plan is not None else None

    def open_run():
        tags = job_tags(cfg, run_dir, prepared) | pretrained_tags(cfg)  # asks git: overlaps Ray's start too
        if plan is not None and plan.parent:
            tags |= {"lmforge.parent_run_dir": plan.parent["run_dir"], "lmforge.parent_checkpoint": plan.checkpoint,
                     "lmforge.parent_step": plan.step, "mlflow.parentRunId": plan.parent["mlflow_run_id"] or ""}
        record = describe_run(list(overrides), plan, run_dir, prepared, config_dict, tags)
        before = run_status(cfg.tracking, cfg.paths.root, run_id) if run_id else None
        return start_run(cfg.tracking, cfg.paths.root, run_name, params=config_dict, tags=tags, run_id=run_id,
                         record=record), before

    with ThreadPoolExecutor(max_workers=1) as pool:
        tracking = pool.submit(open_run)
        try:
            embedded = connect(address, cfg, worker_env)
            if embedded:
                start_autoscaling_coordinator()
        except Exception as error:
            with contextlib.suppress(Exception):
                end_failed(cfg, *tracking.result(), trained=False)
            if isinstance(error, LmforgeError):
                raise
            where = redact_value(address or os.environ.get("RAY_ADDRESS") or "a local Ray cluster")
            raise LmforgeError(f"cannot reach the Ray cluster at {where}: {type(error).__name__}: "
                               f"{redact_value(str(error).splitlines()[0] if str(error) else '')}") from None
        run_id, before = tracking.result()
    return run_id, before, embedded


def pretrained_tags(cfg: LmforgeConfig) -> dict[str, str]:
    """The lineage of a run that starts from model.pretrained: the lmforge run and checkpoint it came from
    (recorded in the export's lmforge_export.json), or the published model's directory."""
    if not cfg.model.pretrained:
        return {}
    import json

    tags = {"lmforge.parent_dir": cfg.model.pretrained}
    info_file = Path(cfg.model.pretrained) / "lmforge_export.json"
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        tags |= {"lmforge.parent_run_id": info.get("mlflow_run_id") or "", "lmforge.parent_run_dir":
                 info.get("run_dir") or "", "lmforge.parent_checkpoint": info.get("checkpoint") or "",
                 "lmforge.parent_step": str(info.get("step", ""))}
    return {k: v for k, v in tags.items() if v}


def describe_run(overrides: list[str], plan, run_dir: str, prepared: str, config_dict: dict, tags: dict):
    """What the MLflow run shows besides params: the command line, the config, overrides and data manifest
    files, the parent run to link to, and for a resume of the same run the keys it changed."""
    from orchestrator.run_record import (
        CONFIG_FILE,
        MANIFEST_FILE,
        OVERRIDES_FILE,
        RunRecord,
        command_line,
        config_yaml,
        flat_changes,
        manifest_text,
        overrides_text,
    )

    files = {CONFIG_FILE: config_yaml(config_dict), OVERRIDES_FILE: overrides_text(overrides)}
    if manifest := manifest_text(prepared):
        files[MANIFEST_FILE] = manifest
    parent = tags.get("mlflow.parentRunId") or tags.get("lmforge.parent_run_id") or None
    record = RunRecord(command_line(overrides), files, parent)
    if plan is not None and not plan.parent:  # the same run continues: its params show the old values
        saved = runs.read_run_info(run_dir) or {}
        # run_name and resume always differ from a first run's; they are not what the user changed.
        record.changes = flat_changes(saved.get("config", {}), redact_config(config_dict),
                                      ignore=("run_name", "resume"))
        record.step = plan.step
    return record


def end_failed(cfg: LmforgeConfig, run_id: str | None, status_before: str | None, trained: bool) -> None:
    """A run that failed ends FAILED, except a resume that failed before training a step: that leaves its
    MLflow run as it was (a FINISHED run stays FINISHED because a later attempt could not start)."""
    from orchestrator.tracking import finish_run, restore_status

    if status_before is not None and not trained:
        restore_status(cfg.tracking, cfg.paths.root, run_id, status_before)
    else:
        finish_run(cfg.tracking, cfg.paths.root, run_id, "FAILED")


def make_trainer(cfg: LmforgeConfig, config_dict: dict, embedded: bool, prepared: str, mlflow_run_id: str | None,
                 run_dir: str, resume_from: str | None, worker_env: dict[str, str], progress=None,
                 callbacks: list | None = None):
    """The run's TorchTrainer, built without side effects: `lmforge train` fits it directly and a sweep fits
    one per trial inside a Tune trainable (with Tune's report callback in `callbacks`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    hw = cfg.hardware
    return trainer_class(embedded)(
        _train_loop,
        train_loop_config={"config": config_dict, "prepared": prepared, "mlflow_run_id": mlflow_run_id,
                           "run_dir": run_dir, "progress": progress, "resume_from": resume_from,
                           "credentials": worker_credentials(embedded)},
        torch_config=torch_config_class(embedded)(backend=hw.backend),
        scaling_config=ScalingConfig(
            num_workers=(hw.min_workers, hw.workers) if hw.min_workers else hw.workers,
            use_gpu=hw.use_gpu, resources_per_worker={"CPU": hw.cpus_per_worker} | ({"GPU": 1} if hw.use_gpu else {}),
            placement_strategy=hw.placement_strategy),
        run_config=RunConfig(
            name=run_dir.rsplit("/", 1)[1], storage_path=run_dir.rsplit("/", 1)[0],
            failure_config=FailureConfig(max_failures=cfg.trainer.max_failures),
            # lmforge prunes checkpoints itself (checkpoint.prune), by its own markers: Ray keeps them all.
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            worker_runtime_env=worker_runtime_env(worker_env), callbacks=callbacks),
    )


def worker_credentials(embedded: bool):
    """The MLflow/W&B login of this process for workers that do not inherit its environment (a cluster this
    process joined), as an object-store reference: Ray Train exports train_loop_config into its run state,
    which the dashboard shows, and a runtime_env's env_vars are shown too; an object's contents are not."""
    from orchestrator.credentials import client_credentials

    credentials = {} if embedded else client_credentials()
    if not credentials:
        return None
    import ray

    return ray.put(credentials)


def fit(cfg: LmforgeConfig, config_dict: dict, embedded: bool, prepared: str, mlflow_run_id: str | None,
        run_dir: str, plan, worker_env: dict[str, str]) -> dict:
    """Run the workers under Ray Train while drawing their progress; the last metrics, plus "error" if
    trainer.fit raised."""
    from ray.util.queue import Queue

    from orchestrator.progress import DONE, follow

    events = Queue(actor_options={"num_cpus": 0})
    trainer = make_trainer(cfg, config_dict, embedded, prepared, mlflow_run_id, run_dir,
                           plan.checkpoint if plan is not None else None, worker_env, progress=events)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # re-raised on the main thread
            outcome["error"] = e
        finally:
            with contextlib.suppress(Exception):  # a dead queue actor: follow() notices the thread ended
                events.put(DONE)

    fitter = threading.Thread(target=run, daemon=True)
    fitter.start()
    metrics = follow(events, fitter)
    fitter.join()
    return metrics | ({"error": outcome["error"]} if "error" in outcome else {})


def trainer_class(embedded: bool):
    """Ray Train's TorchTrainer, less two helper actors this job never uses.

    Each is a Python process: about 1.2 s of CPU while the workers start, then ~1% of a core for the whole
    run, on the same cores as training. The dataset manager serves Ray Datasets passed to the trainer, and
    lmforge passes none (workers read their own shards). The placement-group cleaner removes the workers'
    placement group if the controller dies but the cluster lives on; an embedded cluster dies with the
    driver. Callbacks are matched by name, so on a Ray that renamed them both simply stay.
    """
    from ray.train.torch import TorchTrainer

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            unused = set() if self.datasets else {"DatasetsCallback"}
            if embedded:
                unused.add("PlacementGroupCleanerCallback")
            return [cb for cb in super()._create_default_callbacks() if type(cb).__name__ not in unused]

        def _initialize_and_run_controller(self, **kwargs):
            # A user error on a worker ends the run at once instead of being retried max_failures times.
            policy = failure_policy(self.run_config.failure_config)
            if policy is not None and "failure_policy" in kwargs:
                kwargs["failure_policy"] = policy
            return super()._initialize_and_run_controller(**kwargs)

    return LeanTorchTrainer


def torch_config_class(embedded: bool):
    """Ray Train's TorchConfig; on the embedded cluster, one whose rendezvous store also stays on loopback."""
    if embedded:
        from orchestrator.loopback import LoopbackTorchConfig

        return LoopbackTorchConfig
    from ray.train.torch import TorchConfig

    return TorchConfig


def import_trainer_modules() -> None:
    import ray.train.torch  # noqa: F401
    import ray.util.queue  # noqa: F401


def startup_phases(marks: dict[str, float], first_step: float | None) -> dict[str, float]:
    """Durations between consecutive start-up marks, named after the phase that ended."""
    if first_step is not None:
        marks = marks | {"first_step": first_step}
    ordered = sorted(marks.items(), key=lambda kv: kv[1])
    return {name: round(t - prev, 2) for (_, prev), (name, t) in zip(ordered, ordered[1:])}


def _train_loop(loop_config: dict) -> None:
    # Imported on the worker, so the driver never pays for DeepSpeed's import.
    from orchestrator.worker import train_loop

    train_loop(loop_config)
