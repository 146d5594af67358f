"""Hide Ray, DeepSpeed, MLflow and HF log spam unless --verbose; users should see their run."""

import contextlib
import io
import logging
import os
import sys
import warnings

NOISY_LOGGERS = ("ray", "ray.train", "ray.data", "ray.tune", "DeepSpeed", "deepspeed", "mlflow", "alembic",
                 "transformers", "datasets", "torch.distributed", "urllib3", "filelock", "fsspec", "py.warnings")

# Environment for this process and every Ray worker it starts.
QUIET_ENV = {
    "PYTHONWARNINGS": "ignore",
    "RAY_DEDUP_LOGS": "1",
    "RAY_TRAIN_ENABLE_STATE_TRACKING": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DATASETS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_LOGGING_LEVEL": "ERROR",
    "GIT_PYTHON_REFRESH": "quiet",
    "DS_LOG_LEVEL": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}

# Never from any hub: the project runs offline and tests must not reach out.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}


def set_verbosity(verbose: bool) -> dict[str, str]:
    """Quiet this process; return the env vars workers should inherit for the same behaviour."""
    env = dict(OFFLINE_ENV)
    if not verbose:
        env.update(QUIET_ENV)
    for key, value in env.items():
        os.environ.setdefault(key, value)
    os.environ["LMFORGE_VERBOSE"] = "1" if verbose else "0"
    use_own_torch_extensions_dir()  # an embedded cluster's workers inherit it
    if not verbose and not _has_cuda_driver():
        # Saves DeepSpeed probing for CUDA and warning about it in every process.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        env["DS_ACCELERATOR"] = os.environ["DS_ACCELERATOR"]
    if not verbose:
        silence_loggers()
    return {k: os.environ[k] for k in env} | {"LMFORGE_VERBOSE": os.environ["LMFORGE_VERBOSE"]}


def use_own_torch_extensions_dir() -> None:
    """Have DeepSpeed JIT-build its ops (the CPU comm op) inside this Python environment, unless the user chose.

    torch's default, ~/.cache/torch_extensions, is shared by every environment of the user, and a build from
    another environment counts as stale: two checkouts rebuilt the op in turn, 30-76 s each time. A Python
    whose prefix is not writable (a system Python) keeps torch's default.
    """
    if os.access(sys.prefix, os.W_OK):
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def silence_loggers() -> None:
    warnings.filterwarnings("ignore")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _has_cuda_driver() -> bool:
    return os.path.exists("/proc/driver/nvidia/version") or bool(os.environ.get("CUDA_VISIBLE_DEVICES"))


@contextlib.contextmanager
def muted():
    """Swallow print() and tqdm output of library code (DeepSpeed's converters narrate) unless --verbose."""
    if os.environ.get("LMFORGE_VERBOSE") == "1":
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield
