"""Driver side of `lmforge train`: prepare data once, start or join Ray, run TorchTrainer, track the run."""

import contextlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from common.errors import LmforgeError
from data.prepared import prepare_training_data
from orchestrator import runs
from orchestrator.checkpoint import latest_checkpoint
from orchestrator.config import GROUPS, from_dict, to_dict
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


def apply_resume(cfg: LmforgeConfig, overrides: list[str]) -> tuple[LmforgeConfig, dict, str | None]:
    """The saved run's config, with only the keys given on this command line changed."""
    run_dir, latest = runs.resolve(cfg.resume, cfg)
    info = runs.read_run_info(run_dir)
    if info is None:
        raise LmforgeError(f"{run_dir} has no {runs.RUN_INFO}; it was not written by lmforge train")
    merged = OmegaConf.create(info["config"])
    fresh = OmegaConf.structured(cfg)
    for item in overrides:
        key = item.lstrip("+~").split("=", 1)[0]
        if key in GROUPS:  # hardware=gpu-8: take the whole freshly composed group
            if key != "experiment":
                merged[key] = fresh[key]
        elif key != "resume":
            OmegaConf.update(merged, key, OmegaConf.select(fresh, key), force_add=True)
    merged.paths = fresh.paths
    merged.resume = cfg.resume
    resumed = from_dict(OmegaConf.to_container(merged))
    resumed.validate()
    return resumed, info, latest


def connect(address: str | None, cfg: LmforgeConfig, worker_env: dict[str, str]) -> bool:
    """Join the cluster at `address` or RAY_ADDRESS, else start an embedded one; True if it was started here."""
    import ray

    if ray.is_initialized():  # an embedding program (a test, a notebook) already chose the cluster
        return False
    verbose = os.environ.get("LMFORGE_VERBOSE") == "1"
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": worker_env}
    if address:
        # A remote cluster gets this checkout as the job's working directory; the packages are top-level.
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
    from orchestrator.progress import DONE, follow
    from orchestrator.tracking import finish_run, start_run

    wall_started = time.time()
    # Ray Train's torch side imports torch (about 2 s on a small machine); that overlaps preparing data and
    # starting Ray and the MLflow run, which mostly wait on other processes.
    trainer_modules = threading.Thread(target=import_trainer_modules, daemon=True)
    trainer_modules.start()
    resume_from = None
    if cfg.resume:
        cfg, info, resume_from = apply_resume(cfg, overrides)
        run_name, mlflow_run_id = info["run_name"], info["mlflow_run_id"]
    else:
        run_name, mlflow_run_id = cfg.run_name or runs.default_run_name(cfg), None
    run_dir = f"{runs.storage_root(cfg)}/{run_name}"
    if not cfg.resume and runs.read_run_info(run_dir) is not None:
        raise LmforgeError(f"run {run_name} already exists in {run_dir}; pass resume={run_dir} to continue it")

    marks = {"start": wall_started}
    prepared = str(prepare_training_data(cfg.data, cfg.paths.root, cfg.seed))
    marks["data_prepared"] = time.time()
    config_dict = to_dict(cfg)
    with ThreadPoolExecutor(max_workers=1) as pool:
        # Creating a fresh MLflow store takes seconds; let it overlap Ray's start-up.
        tracking = pool.submit(start_run, cfg.tracking, cfg.paths.root, run_name, params=config_dict,
                               tags={"lmforge.run_dir": run_dir, "lmforge.prepared_data": prepared},
                               run_id=mlflow_run_id)
        embedded = connect(address, cfg, worker_env or {})
        if embedded:
            start_autoscaling_coordinator()
        mlflow_run_id = tracking.result()
    trainer_modules.join()
    runs.write_run_info(run_dir, {"run_name": run_name, "mlflow_run_id": mlflow_run_id, "config": config_dict,
                                  "prepared": prepared})
    marks["ray_and_tracking_ready"] = time.time()

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig
    from ray.util.queue import Queue

    hw = cfg.hardware
    events = Queue(actor_options={"num_cpus": 0})
    trainer = trainer_class(embedded)(
        _train_loop,
        train_loop_config={"config": config_dict, "prepared": prepared, "mlflow_run_id": mlflow_run_id,
                           "run_dir": run_dir, "progress": events, "resume_from": resume_from},
        torch_config=TorchConfig(backend=hw.backend),
        scaling_config=ScalingConfig(
            num_workers=(hw.min_workers, hw.workers) if hw.min_workers else hw.workers,
            use_gpu=hw.use_gpu, resources_per_worker={"CPU": hw.cpus_per_worker} | ({"GPU": 1} if hw.use_gpu else {}),
            placement_strategy=hw.placement_strategy),
        run_config=RunConfig(
            name=run_name, storage_path=runs.storage_root(cfg),
            failure_config=FailureConfig(max_failures=cfg.trainer.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
            worker_runtime_env=worker_runtime_env(worker_env or {})),
    )
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # re-raised on the main thread
            outcome["error"] = e
        finally:
            with contextlib.suppress(Exception):  # a dead queue actor: follow() notices the thread ended
                events.put(DONE)

    fitter = threading.Thread(target=fit, daemon=True)
    fitter.start()
    try:
        metrics = follow(events, fitter)
    except KeyboardInterrupt:  # Ctrl-C: the checkpoints stay resumable; close the MLflow run as killed
        finish_run(cfg.tracking, cfg.paths.root, mlflow_run_id, "KILLED")
        raise
    fitter.join()
    first_step = metrics.pop("first_step_at", None)
    startup = startup_phases(marks | metrics.pop("worker_startup", {}), first_step)
    failed = metrics.pop("failed", None)
    if "error" in outcome or failed:
        finish_run(cfg.tracking, cfg.paths.root, mlflow_run_id, "FAILED")
        if failed:
            raise LmforgeError(f"training failed: {failed}")
        raise LmforgeError(f"training failed: {worker_user_error(outcome['error']) or outcome['error']}") \
            from outcome["error"]
    finish_run(cfg.tracking, cfg.paths.root, mlflow_run_id, "FINISHED")
    return TrainResult(run_name, run_dir, mlflow_run_id, metrics, latest_checkpoint(run_dir),
                       first_step - wall_started if first_step else None, startup, wall_started)


def worker_user_error(error: BaseException) -> LmforgeError | None:
    """The LmforgeError behind a worker failure, whose message says it all, without Ray's traceback around it."""
    for failure in getattr(error, "worker_failures", {}).values():
        seen = 0
        while failure is not None and seen < 8:
            if isinstance(failure, LmforgeError):
                return failure
            failure, seen = getattr(failure, "cause", None) or failure.__cause__, seen + 1
    return None


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

    return LeanTorchTrainer


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
