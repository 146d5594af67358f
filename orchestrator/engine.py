"""DeepSpeed set-up: the DeepSpeed config is derived from the lmforge config, the single source of truth."""

import functools
import importlib
import math
import os
import re
import sys

import torch

from orchestrator.quiet import use_own_torch_extensions_dir
from orchestrator.schema import HardwareConfig, LmforgeConfig, TrainerConfig


def deepspeed_config(cfg: LmforgeConfig, world_size: int, load_universal: bool = False) -> dict:
    hw, tr = cfg.hardware, cfg.trainer
    zero: dict = {"stage": hw.zero_stage}
    # No elastic_checkpoint: DeepSpeed's elastic format drops optimizer state on reload, so resumed losses
    # drift from an uninterrupted run. A change of worker count goes through a universal checkpoint instead.
    if hw.zero_stage >= 2:
        # Overlapping gradient reduction with the backward pass pays off only when there is communication;
        # on one GPU its stream synchronizations alone cost 20% of a gpt2-124m step (bench/RESULTS.md).
        zero.update(overlap_comm=hw.use_gpu and world_size > 1, contiguous_gradients=True)
    if hw.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(hw, hw.offload_optimizer)
    if hw.offload_param != "none":
        zero["offload_param"] = _offload(hw, hw.offload_param)
    return {
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": tr.gradient_accumulation_steps,
        "train_batch_size": tr.micro_batch_size * tr.gradient_accumulation_steps * world_size,
        "gradient_clipping": tr.grad_clip,
        "optimizer": {"type": "AdamW", "params": torch_adamw(tr, hw)},
        "zero_optimization": zero,
        # DeepSpeed's bf16 overflow check reads every step's gradients back to the host; lmforge instead
        # checks the loss and grad norm it reads anyway (worker.divergence), unless told to skip such steps.
        "bf16": {"enabled": hw.precision == "bf16", "check_grad_overflow": tr.skip_nonfinite_steps},
        "fp16": {"enabled": hw.precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 10**9,  # lmforge does the logging
        "wall_clock_breakdown": False,
        # lmforge meters throughput itself; DeepSpeed's timer would synchronize the device twice a step.
        "timers": {"throughput": {"enabled": False}},
    }


def torch_adamw(tr: TrainerConfig, hw: HardwareConfig) -> dict:
    """AdamW's DeepSpeed params. Unless the optimizer is offloaded (that needs DeepSpeed's CPU Adam), use
    torch's AdamW rather than DeepSpeed's FusedAdam: torch's fused CUDA kernel is one launch per step as
    FusedAdam's is, and FusedAdam is a CUDA op each node would first JIT-build with nvcc (a minute at cold
    start, and nvcc on every GPU node). On CPU, torch's AdamW is as fast and needs no build either."""
    params = {"lr": tr.lr, "betas": [tr.beta1, tr.beta2], "eps": 1e-8, "weight_decay": tr.weight_decay}
    if hw.offload_optimizer != "none":
        return params
    return params | {"torch_adam": True} | ({"fused": True} if hw.use_gpu else {})


def plain_arch_list(arch_list: str) -> str:
    """TORCH_CUDA_ARCH_LIST as DeepSpeed's JIT builder can read it: "major.minor[+PTX]" entries only.

    CUDA images set arch-specific targets such as "9.0a" for Hopper, on which DeepSpeed's builder raises
    ValueError; its ops use no arch-specific instructions, so they are built for the plain arch instead.
    """
    return re.sub(r"(\d+\.\d+)[a-z]+", r"\1", arch_list)


def _offload(hw: HardwareConfig, device: str) -> dict:
    spec = {"device": device, "pin_memory": hw.use_gpu}
    if device == "nvme":
        spec["nvme_path"] = hw.nvme_path
    return spec


def lr_at(step: int, tr: TrainerConfig) -> float:
    """Linear warmup to `lr`, then cosine or linear decay to `min_lr` at `max_steps`."""
    if step < tr.warmup_steps:
        return tr.lr * (step + 1) / tr.warmup_steps
    if tr.lr_schedule == "constant":
        return tr.lr
    progress = min(1.0, (step - tr.warmup_steps) / max(1, tr.max_steps - tr.warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if tr.lr_schedule == "cosine" else 1.0 - progress
    return tr.min_lr + (tr.lr - tr.min_lr) * shape


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # Decaying biases, norms and embeddings hurts; only matmul weights get weight decay.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "wte" not in name and "wpe" not in name and "embed" not in name
         else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def import_deepspeed():
    """`import deepspeed`, minus two imports that cost each worker about 2.5 s of CPU at start-up and that
    lmforge never uses, while the other workers and Ray's actors start on the same cores.

    - DeepSpeed's autotuner imports MLflow (pandas, scipy, fastapi) when it is installed. MLflow is hidden
      while DeepSpeed loads, if nothing has imported it yet; a worker builds its engine before it starts
      anything that imports MLflow (rank 0's tracker), so no other thread's import can fall into that window.
    - `deepspeed.initialize` imports its Muon optimizer only to ask whether ours is one, and that module
      applies `torch.compile` at import, which loads Inductor. It is imported here with compilation deferred
      to the first call of each function, which lmforge's AdamW never makes.
    """
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        deepspeed = importlib.import_module("deepspeed")
    else:
        sys.modules["mlflow"] = None  # makes `import mlflow` raise ImportError, which DeepSpeed handles
        try:
            deepspeed = importlib.import_module("deepspeed")
        finally:
            if sys.modules.get("mlflow", 0) is None:
                del sys.modules["mlflow"]
    _import_with_deferred_compile("deepspeed.runtime.zero.muon.muon_optimizer")
    return deepspeed


def _import_with_deferred_compile(module: str) -> None:
    if module in sys.modules:
        return
    compile_now = torch.compile

    def compile_later(fn=None, **options):
        if fn is None:  # used as @torch.compile(...)
            return lambda f: compile_later(f, **options)
        compiled = None

        @functools.wraps(fn)
        def call(*args, **kwargs):
            nonlocal compiled
            compiled = compiled or compile_now(fn, **options)
            return compiled(*args, **kwargs)
        return call

    torch.compile = compile_later
    try:
        importlib.import_module(module)
    except ImportError:  # an older or newer DeepSpeed without it
        pass
    finally:
        torch.compile = compile_now


def use_own_ninja() -> None:
    """Put this environment's `ninja` first on PATH for the ops DeepSpeed builds on first use.

    DeepSpeed installs the `ninja` package, but which ninja runs depends on whether the venv is activated,
    and a machine may have a system ninja of another version. Each version takes the other's build log for
    stale and rebuilds the op from scratch (about 35 s on 2 cores) whenever the two alternate.
    """
    own = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.exists(os.path.join(own, "ninja")) and path.split(os.pathsep)[0] != own:
        os.environ["PATH"] = own + os.pathsep + path


def build_engine(model: torch.nn.Module, cfg: LmforgeConfig, world_size: int, load_universal: bool = False):
    """Wrap `model` in a DeepSpeed engine with AdamW and the warmup/decay schedule from the config."""
    deepspeed = import_deepspeed()
    use_own_ninja()
    use_own_torch_extensions_dir()  # also on workers of a cluster joined with --address, in their environment
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = plain_arch_list(os.environ["TORCH_CUDA_ARCH_LIST"])
    if cfg.hardware.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tr = cfg.trainer
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, tr.weight_decay),
        config=deepspeed_config(cfg, world_size, load_universal),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, tr) / tr.lr),
        dist_init_required=False,
    )
    return engine
