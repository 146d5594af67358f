"""Where a GPU training step's time goes: lmforge's DeepSpeed step under config variants against the plain loop.

    python bench/gpu_step_probe.py --model gpt2-124m [--variants plain lmforge ...] [--steps 40] [--rounds 2]

Every variant runs in this one process, one after another and round after round, on the same model, data
and batches, so the ratios compare like with like. Per variant it reports tokens/s (median 10-step
window, the loss read once per window as lmforge does), and from torch.profiler over a few steps: the
host-device syncs per step (cudaStreamSynchronize, cudaDeviceSynchronize, cudaEventSynchronize, and
device-to-host copies) and how busy the GPU was (kernel time over wall time). A variant patches the
DeepSpeed config that orchestrator/engine.py derives, or the lmforge config, so each can be tried before
it becomes a default (bench/RESULTS.md has the table that chose lmforge's). Diagnostic only: gpu_bench.py
is the benchmark of record.
"""

import argparse
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_bench import SHAPES  # noqa: E402
from torch_loop import make_step  # noqa: E402

from data.prepared import prepare_training_data  # noqa: E402
from orchestrator import engine as engine_module  # noqa: E402
from orchestrator.config import load_config  # noqa: E402

WINDOW = 10
# lmforge's defaults turn DeepSpeed's throughput timer and bf16 overflow check off; these turn them back on.
TIMER = {"timers": {"throughput": {"enabled": True}}}
OVERFLOW_CHECK = {"bf16": {"check_grad_overflow": True}}  # merged into the derived bf16 section
# name: (lmforge overrides, DeepSpeed config patch); "plain" is the plain PyTorch loop.
VARIANTS = {
    "plain": ([], None),
    "lmforge": ([], {}),
    "with-overflow-check": ([], OVERFLOW_CHECK),
    "with-timer-and-overflow-check": ([], TIMER | OVERFLOW_CHECK),  # DeepSpeed's defaults
    "no-clip": (["trainer.grad_clip=0"], {}),
    "zero0": (["hardware.zero_stage=0"], {}),
    "zero1": (["hardware.zero_stage=1"], {}),
    "zero2": (["hardware.zero_stage=2"], {}),
    "zero2-overlap-comm": (["hardware.zero_stage=2"], {"zero_optimization": {"overlap_comm": True}}),
}
# Without a GPU it still runs (on the CPU, hardware=cpu), to check the script itself.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def merged(base: dict, patch: dict) -> dict:
    out = dict(base)
    for key, value in patch.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def make_variant_step(variant: str, base: list[str], prepared: str):
    overrides, patch = VARIANTS[variant]
    cfg = load_config(base + overrides)
    if patch is None:
        return make_step(cfg, prepared, 0, 1, DEVICE)
    derive = engine_module.deepspeed_config
    engine_module.deepspeed_config = lambda *a, **k: merged(derive(*a, **k), patch)
    try:
        return make_step(cfg, prepared, 0, 1, DEVICE, use_deepspeed=True)
    finally:
        engine_module.deepspeed_config = derive


def timed_windows(step, steps: int) -> list[float]:
    windows, started = [], time.perf_counter()
    for i in range(steps):
        loss = step()
        if (i + 1) % WINDOW == 0:
            loss.item()
            windows.append((time.perf_counter() - started) / WINDOW)
            started = time.perf_counter()
    return windows


def profile(step, steps: int = 5) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
    loss = step()
    loss.item()
    with torch_profile(activities=activities) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            loss = step()
        loss.item()
        wall = time.perf_counter() - started
    counts, kernel_us = {}, 0.0
    for e in prof.key_averages():
        if e.key in SYNCS or e.key == "aten::_local_scalar_dense":
            counts[e.key] = e.count / steps
        if "Memcpy DtoH" in e.key and e.device_type == DeviceType.CUDA:
            counts["DtoH copies"] = e.count / steps
        if e.device_type == DeviceType.CUDA:
            kernel_us += e.self_device_time_total
    return {"syncs": counts, "gpu_busy": kernel_us / 1e6 / wall, "ms_per_step": wall / steps * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-124m", help="a conf/model name")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29535"}.items():
        os.environ.setdefault(key, value)
    gpu = DEVICE.type == "cuda"
    if gpu:
        torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl" if gpu else "gloo")
    base = ["hardware=gpu-1" if gpu else "hardware=cpu", f"model={args.model}", *SHAPES.get(args.model, []), f"trainer.max_steps={args.steps}",
            "trainer.warmup_steps=4", "tracking=none", f"paths.root={os.environ.get('TMPDIR', '/tmp')}/probe"]
    cfg = load_config(base)
    prepared = str(prepare_training_data(cfg.data, cfg.paths.root, cfg.seed))
    tokens_per_step = cfg.trainer.micro_batch_size * cfg.data.seq_len
    windows = {v: [] for v in args.variants}
    profiles = {}
    for round_ in range(args.rounds):
        for variant in args.variants:
            step = make_variant_step(variant, base, prepared)
            windows[variant] += timed_windows(step, args.steps)[1:]
            if round_ == 0 and not args.no_profile:
                profiles[variant] = profile(step)
            del step
            gc.collect()
            left = ""
            if gpu:
                torch.cuda.empty_cache()
                left = f"; {torch.cuda.memory_allocated() / 2**30:.1f} GiB left allocated"
            print(f"probe: round {round_ + 1} {variant}: {tokens_per_step / statistics.median(windows[variant]):,.0f} "
                  f"tokens/s{left}", flush=True)
    plain = tokens_per_step / statistics.median(windows["plain"]) if "plain" in windows else None
    print(f"\n{args.model}, {cfg.data.seq_len} x {cfg.trainer.micro_batch_size} tokens/step, "
          f"{args.rounds} rounds x {args.steps} steps, {torch.cuda.get_device_name() if gpu else 'CPU'}, "
          f"torch {torch.__version__}")
    print("| variant | tokens/s | vs plain | spread (min-max window) | GPU busy | syncs per step |")
    print("|---|---|---|---|---|---|")
    for variant in args.variants:
        w = windows[variant]
        tps = tokens_per_step / statistics.median(w)
        p = profiles.get(variant, {})
        syncs = ", ".join(f"{k} {v:g}" for k, v in sorted(p.get("syncs", {}).items()))
        print(f"| {variant} | {tps:,.0f} | {tps / plain if plain else float('nan'):.3f} | "
              f"{tokens_per_step / max(w):,.0f}-{tokens_per_step / min(w):,.0f} | "
              f"{p.get('gpu_busy', float('nan')):.1%} | {syncs} |")


if __name__ == "__main__":
    main()
