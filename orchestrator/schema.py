"""Typed schema for every config group; Hydra merges conf/ YAML into these dataclasses."""

from dataclasses import dataclass, field

from common.errors import require
from data.config import DataConfig
from model.config import FAMILIES, ModelConfig
from model.objectives.config import ObjectiveConfig

BACKENDS = ("gloo", "nccl")
PRECISIONS = ("fp32", "bf16", "fp16")
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
LR_SCHEDULES = ("cosine", "linear", "constant")
TRACKING_BACKENDS = ("mlflow", "none")
SWEEP_SEARCHES = ("grid", "random", "optuna")
SWEEP_SCHEDULERS = ("asha", "none")


@dataclass
class HardwareConfig:
    name: str = "cpu"
    workers: int = 2
    min_workers: int | None = None  # set to make the run elastic between min_workers and workers
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    backend: str = "gloo"
    precision: str = "fp32"
    zero_stage: int = 2
    offload_optimizer: str = "none"
    offload_param: str = "none"  # ZeRO-3 only
    nvme_path: str | None = None
    activation_checkpointing: bool = False
    placement_strategy: str = "PACK"
    # The embedded local cluster's Ray dashboard, on 127.0.0.1 only. Off by default: on a small machine its
    # processes take CPU from the workers. Clusters given with --address keep their own setting.
    ray_dashboard: bool = False
    # Peak dense FLOP/s of one worker's device, for MFU (H100 SXM bf16: 989e12). Null: no MFU is reported,
    # as for CPUs, whose peak depends on the core, its vector units and its clock.
    peak_flops_per_worker: float | None = None

    def validate(self, at: str = "hardware") -> None:
        require(self.workers >= 1, f"{at}.workers", self.workers, "an integer >= 1")
        require(self.min_workers is None or 1 <= self.min_workers <= self.workers, f"{at}.min_workers",
                self.min_workers, f"null or an integer in [1, hardware.workers={self.workers}]")
        require(self.cpus_per_worker > 0, f"{at}.cpus_per_worker", self.cpus_per_worker, "a number > 0")
        require(self.backend in BACKENDS, f"{at}.backend", self.backend, f"one of {', '.join(BACKENDS)}")
        require(self.backend != "nccl" or self.use_gpu, f"{at}.backend", self.backend,
                "gloo when hardware.use_gpu=false (NCCL needs GPUs)")
        require(self.precision in PRECISIONS, f"{at}.precision", self.precision, f"one of {', '.join(PRECISIONS)}")
        require(self.precision == "fp32" or self.use_gpu, f"{at}.precision", self.precision,
                "fp32 when hardware.use_gpu=false")
        require(self.zero_stage in (0, 1, 2, 3), f"{at}.zero_stage", self.zero_stage, "one of 0, 1, 2, 3")
        for key in ("offload_optimizer", "offload_param"):
            value = getattr(self, key)
            require(value in OFFLOAD_DEVICES, f"{at}.{key}", value, f"one of {', '.join(OFFLOAD_DEVICES)}")
        require(self.offload_optimizer == "none" or self.zero_stage >= 1, f"{at}.offload_optimizer",
                self.offload_optimizer, "none when hardware.zero_stage=0")
        require(self.offload_param == "none" or self.zero_stage == 3, f"{at}.offload_param",
                self.offload_param, "none unless hardware.zero_stage=3")
        uses_nvme = "nvme" in (self.offload_optimizer, self.offload_param)
        require(not uses_nvme or bool(self.nvme_path), f"{at}.nvme_path", self.nvme_path,
                "a local directory when offloading to nvme")
        require(self.placement_strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
                f"{at}.placement_strategy", self.placement_strategy, "PACK, SPREAD, STRICT_PACK or STRICT_SPREAD")
        require(self.peak_flops_per_worker is None or self.peak_flops_per_worker > 0,
                f"{at}.peak_flops_per_worker", self.peak_flops_per_worker, "null or a number > 0")


@dataclass
class TrainerConfig:
    max_steps: int = 300  # optimizer steps
    micro_batch_size: int = 8  # sequences per worker per forward pass
    gradient_accumulation_steps: int = 1
    lr: float = 3.0e-3
    min_lr: float = 3.0e-4
    warmup_steps: int = 30
    lr_schedule: str = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    log_every: int = 10
    eval_every: int = 100  # 0 evaluates only at the end
    eval_batches: int = 8
    max_failures: int = 3  # worker-group restarts from the latest checkpoint before the run fails
    # A step whose gradients hold inf/NaN: false stops the run at the next logged step with a clear error
    # (no checkpoint is written from it); true has DeepSpeed skip it, at a device sync per step (bf16 only).
    skip_nonfinite_steps: bool = False
    # Model selection: the validation metric that picks the best checkpoint and stops early; null: the
    # objective's own (a fine-tuning task's headline metric such as val/f1, else val/loss) and its direction.
    monitor: str | None = None
    monitor_mode: str | None = None  # min or max
    early_stopping_patience: int = 0  # evaluations without improvement before the run stops; 0: never stops
    early_stopping_min_delta: float = 0.0  # a change smaller than this is no improvement

    def validate(self, at: str = "trainer") -> None:
        for key in ("max_steps", "micro_batch_size", "gradient_accumulation_steps", "log_every", "eval_batches"):
            require(getattr(self, key) >= 1, f"{at}.{key}", getattr(self, key), "an integer >= 1")
        require(self.lr > 0, f"{at}.lr", self.lr, "a float > 0")
        require(0 <= self.min_lr <= self.lr, f"{at}.min_lr", self.min_lr, f"a float in [0, trainer.lr={self.lr}]")
        require(0 <= self.warmup_steps < self.max_steps, f"{at}.warmup_steps", self.warmup_steps,
                f"an integer in [0, trainer.max_steps={self.max_steps})")
        require(self.lr_schedule in LR_SCHEDULES, f"{at}.lr_schedule", self.lr_schedule,
                f"one of {', '.join(LR_SCHEDULES)}")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"{at}.beta1/beta2", (self.beta1, self.beta2),
                "floats in [0, 1)")
        require(self.grad_clip >= 0, f"{at}.grad_clip", self.grad_clip, "a float >= 0")
        require(self.max_failures >= -1, f"{at}.max_failures", self.max_failures, "an integer >= 0, or -1 for no limit")
        require(self.eval_every >= 0, f"{at}.eval_every", self.eval_every, "an integer >= 0")
        require(self.monitor is None or self.monitor.startswith("val/"), f"{at}.monitor", self.monitor,
                "null or a validation metric such as val/loss, val/accuracy, val/f1")
        require(self.monitor_mode in (None, "min", "max"), f"{at}.monitor_mode", self.monitor_mode,
                "null, min or max")
        require(self.early_stopping_patience >= 0, f"{at}.early_stopping_patience", self.early_stopping_patience,
                "an integer >= 0")
        require(self.early_stopping_min_delta >= 0, f"{at}.early_stopping_min_delta",
                self.early_stopping_min_delta, "a float >= 0")


@dataclass
class CheckpointConfig:
    every: int = 100  # optimizer steps; a checkpoint is always written at the end
    keep_last: int = 3
    storage: str | None = None  # any fsspec URI (s3://, gs://, a shared path); default under paths.root
    # Resume always checks that every file of a checkpoint is present at the size its marker records; this
    # also reads every byte back to compare checksums (slow on object storage, catches silent corruption).
    verify: bool = False
    # Also keep the best checkpoint by trainer.monitor: an evaluation that improves it saves a checkpoint,
    # which pruning spares; `lmforge export --best` exports it. Null: on for fine-tuning tasks, off for
    # pretraining (whose checkpoints are large and whose validation loss keeps falling).
    keep_best: bool | None = None

    def validate(self, at: str = "checkpoint") -> None:
        require(self.every >= 1, f"{at}.every", self.every, "an integer >= 1")
        require(self.keep_last >= 1, f"{at}.keep_last", self.keep_last, "an integer >= 1")


@dataclass
class WandbConfig:
    """Weights & Biases as a second logger next to MLflow; its failures never stop training."""
    enabled: bool = False
    project: str = "lmforge"
    entity: str | None = None
    # "online", "offline" (writes a local run directory, no network) or "disabled"; null: wandb's own
    # default, which honours WANDB_MODE.
    mode: str | None = None

    def validate(self, at: str = "tracking.wandb") -> None:
        require(self.mode in (None, "online", "offline", "disabled"), f"{at}.mode", self.mode,
                "one of online, offline, disabled, or null")


@dataclass
class TrackingConfig:
    name: str = "mlflow-local"
    backend: str = "mlflow"
    tracking_uri: str | None = None  # default: a SQLite store under paths.root
    experiment: str = "lmforge"
    # Seconds one MLflow request may wait. Metric calls never wait: a background thread sends them,
    # and at start-up an unreachable server fails the submit after about this long.
    request_timeout_s: float = 5.0
    # Metrics held in memory while the server is unreachable; beyond this the oldest are dropped and counted.
    max_queued_metrics: int = 100_000
    # At the end of a successful run, log the final export as an MLflow model and register it under
    # model_name (default: <model>-<objective>); register=false logs it in the run only.
    register: bool = True
    model_name: str | None = None
    # MLflow's own CPU/memory/GPU sampling into the run's system/* metrics.
    system_metrics: bool = False
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self, at: str = "tracking") -> None:
        self.wandb.validate(f"{at}.wandb")
        # Checked before training, since registering happens at the end, where a bad name only warns.
        require(self.model_name is None or (bool(self.model_name.strip()) and not any(c in self.model_name
                                                                                          for c in "/:")),
                f"{at}.model_name", self.model_name, "null or a registered model name without '/' or ':'")
        require(self.backend in TRACKING_BACKENDS, f"{at}.backend", self.backend,
                f"one of {', '.join(TRACKING_BACKENDS)}")
        require(self.request_timeout_s > 0, f"{at}.request_timeout_s", self.request_timeout_s, "a number > 0")
        require(self.max_queued_metrics >= 1, f"{at}.max_queued_metrics", self.max_queued_metrics,
                "an integer >= 1")


@dataclass
class SweepConfig:
    """`lmforge sweep`: what to search (Hydra sweep expressions) and how Ray Tune searches and schedules it."""
    name: str = "none"
    # Hydra sweep expressions, as on the command line: "trainer.lr=tag(log,interval(1e-4,1e-2))",
    # "model.n_layer=choice(1,2)", "trainer.micro_batch_size=range(4,17,4)". The command line's win.
    params: list[str] = field(default_factory=list)
    search: str = "random"  # grid (choice/range only: every combination), random, or optuna (TPE)
    metric: str = "val/loss"  # what ASHA, Optuna and the best trial are judged by; reported at every eval
    mode: str = "min"
    num_samples: int = 4  # trials drawn; for grid, how many times the whole grid runs
    max_concurrent_trials: int = 0  # 0: as many as the cluster holds (each needs hardware.workers workers)
    scheduler: str = "asha"  # asha: stop trials that trail the others at trainer steps grace_period*rf^k
    grace_period: int | None = None  # trainer steps before ASHA may stop a trial; null: trainer.eval_every
    reduction_factor: float = 2.0  # ASHA keeps the best 1/reduction_factor of trials at each rung
    max_failures: int = 1  # Tune restarts a failed trial this often, from the trial's own last checkpoint
    # CPUs Tune reserves for each trial's driver (it builds the trial's config and waits on its Train
    # workers, which get their own placement group of hardware.workers x hardware.cpus_per_worker)
    driver_cpus: float = 0.25

    def validate(self, at: str = "sweep") -> None:
        require(self.search in SWEEP_SEARCHES, f"{at}.search", self.search, f"one of {', '.join(SWEEP_SEARCHES)}")
        require(self.scheduler in SWEEP_SCHEDULERS, f"{at}.scheduler", self.scheduler,
                f"one of {', '.join(SWEEP_SCHEDULERS)}")
        require(self.metric.startswith(("val/", "train/")), f"{at}.metric", self.metric,
                "a reported metric such as val/loss, val/accuracy, train/loss")
        require(self.mode in ("min", "max"), f"{at}.mode", self.mode, "min or max")
        require(self.num_samples >= 1, f"{at}.num_samples", self.num_samples, "an integer >= 1")
        require(self.max_concurrent_trials >= 0, f"{at}.max_concurrent_trials", self.max_concurrent_trials,
                "an integer >= 0 (0: as many as fit)")
        require(self.grace_period is None or self.grace_period >= 1, f"{at}.grace_period", self.grace_period,
                "null or an integer >= 1")
        require(self.reduction_factor > 1, f"{at}.reduction_factor", self.reduction_factor, "a number > 1")
        require(self.max_failures >= -1, f"{at}.max_failures", self.max_failures,
                "an integer >= 0, or -1 for no limit")
        require(self.driver_cpus > 0, f"{at}.driver_cpus", self.driver_cpus, "a number > 0")


@dataclass
class PathsConfig:
    root: str = "${oc.env:LMFORGE_HOME,./lmforge_runs}"  # everything a run writes goes under here


@dataclass
class LmforgeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)  # read by `lmforge sweep` only
    seed: int = 1234
    run_name: str | None = None  # default: <model>-<objective>-<timestamp>
    resume: str | None = None  # a run dir, a checkpoint dir, or an MLflow run id

    def validate(self) -> None:
        for section in ("model", "objective", "data", "hardware", "tracking", "trainer", "checkpoint", "sweep"):
            getattr(self, section).validate(section)
        require(self.data.seq_len <= self.model.max_seq_len or self.model.arch == "t5", "data.seq_len",
                self.data.seq_len, f"an integer <= model.max_seq_len={self.model.max_seq_len}")
        from model.objectives import get_objective

        objective = get_objective(self.objective.name)
        fitting = [arch for arch, family in FAMILIES.items() if family in objective.families]
        require(self.model.family in objective.families, "model", f"{self.model.name} (arch {self.model.arch})",
                f"a model that objective={objective.name} trains: model.arch {' or '.join(fitting)}")
        require(objective.name != "contrastive" or self.model.dropout > 0, "model.dropout", self.model.dropout,
                "a float > 0 for objective=contrastive (its two views of a sentence differ only by dropout)")
        require(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        hw, tr = self.hardware, self.trainer
        global_batch = tr.micro_batch_size * tr.gradient_accumulation_steps * hw.workers
        # An elastic run keeps its global batch by gradient accumulation on whatever worker count Ray gives
        # it; the smallest must allow that (a count in between that does not is refused when it happens).
        if hw.min_workers:
            require(global_batch % (tr.micro_batch_size * hw.min_workers) == 0, "hardware.min_workers",
                    hw.min_workers, f"a worker count on which the global batch of {global_batch} sequences "
                    f"(hardware.workers={hw.workers}) splits into micro-batches of {tr.micro_batch_size}")
        require(not self.trainer.skip_nonfinite_steps or self.hardware.precision == "bf16",
                "trainer.skip_nonfinite_steps", True, "false unless hardware.precision=bf16 (fp16 always skips "
                "them for its loss scaling; fp32 cannot)")
