"""Training throughput and MFU on one GPU: lmforge against a plain PyTorch loop on the same model and data.

    python bench/gpu_bench.py [--models gpt2-124m llama-1b] [--steps 60]

Per model, three runs one after another, each in a fresh process:
- plain PyTorch (bench/torch_loop.py): bf16 autocast over fp32 weights, fused AdamW, no DeepSpeed, no Ray;
- lmforge's DeepSpeed engine and step function without Ray (torch_loop.py --deepspeed; NCCL, one process);
- `lmforge train hardware=gpu-1`: Ray Train, DeepSpeed ZeRO-1, bf16, as a user runs it (tracking off, so
  the bench needs no MLflow on the GPU machine).

The two torch_loop rows give every 10-step window; lmforge's row gives the last window it logged, which it
prints with its final metrics. MFU uses model/flops.py against `hardware.peak_flops_per_worker` of gpu-1.
Writes the "Training on one GPU" section of bench/RESULTS.md (or --results).
"""

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train_bench import BENCH, WINDOW, run_torch, write_section

SECTION = "Training on one GPU"
RUNS = ("plain PyTorch loop", "lmforge engine and step, no Ray", "lmforge train (Ray Train)")
SHAPES = {"gpt2-124m": ["data.seq_len=1024", "trainer.micro_batch_size=16"],
          "gpt2-350m": ["data.seq_len=1024", "trainer.micro_batch_size=16"],
          "llama-1b": ["data.seq_len=2048", "trainer.micro_batch_size=8", "hardware.zero_stage=2"],
          "gpt-1.3b": ["data.seq_len=2048", "trainer.micro_batch_size=8", "hardware.zero_stage=2"]}


def workload(model: str, steps: int, root: str) -> list[str]:
    return ["hardware=gpu-1", f"model={model}", *SHAPES.get(model, []), f"trainer.max_steps={steps}",
            "trainer.warmup_steps=4", f"trainer.log_every={WINDOW}", "trainer.eval_every=0", "trainer.eval_batches=1",
            f"checkpoint.every={steps}", "checkpoint.keep_last=1", "tracking=none", f"paths.root={root}"]


def run_lmforge(base: list[str], scratch: str, name: str) -> dict:
    """`lmforge train` in a fresh process; its final line reports the last window and the cold start."""
    log = Path(f"{scratch}/{name}.log")
    with log.open("w") as out:
        code = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", *base, f"run_name={name}"],
                              stdout=out, stderr=subprocess.STDOUT).returncode
    text = log.read_text()
    if code != 0:
        sys.exit(f"lmforge train failed:\n{text[-3000:]}")
    tokens_per_second = float(re.search(r"speed:\s+([\d,]+) tokens/s", text).group(1).replace(",", ""))
    first = re.search(r"first step:\s+([\d.]+)s.*", text)
    if first:
        print(f"gpu bench: {first.group(0)}", flush=True)  # with its phases
    return {"tokens_per_second": tokens_per_second, "first_step_s": float(first.group(1)) if first else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt2-124m"], choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--threads", type=int, default=4, help="torch CPU threads per process")
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    args = parser.parse_args()

    import torch

    from data.prepared import prepare_training_data, read_vocabulary
    from model.build import build_model
    from model.flops import flops_per_token
    from orchestrator.config import load_config

    scratch = tempfile.mkdtemp(prefix="lmforge-gpu-bench-")
    device = torch.cuda.get_device_name()
    rows = []
    for model in args.models:
        base = workload(model, args.steps, scratch)
        cfg = load_config(base)
        prepared = str(prepare_training_data(cfg.data, cfg.paths.root, cfg.seed))
        params = sum(p.numel() for p in build_model(cfg.model, read_vocabulary(prepared).size, cfg.seed).parameters())
        tokens_per_step = cfg.trainer.micro_batch_size * cfg.data.seq_len
        per_token = flops_per_token(params, cfg.model, cfg.data.seq_len)
        measured = {}
        for name in RUNS:
            print(f"gpu bench: {model}: {name}", flush=True)
            if name == RUNS[2]:
                out = run_lmforge(base, scratch, f"{model}-{int(time.time())}")
            else:
                out = run_torch(base, prepared, 1, scratch, deepspeed=name == RUNS[1], threads=args.threads)
            tps = out.get("tokens_per_second") or tokens_per_step / statistics.median(out["windows"][1:])
            measured[name] = tps
            rows.append({"model": f"{model} ({params / 1e6:.0f}M)", "run": name, "tps": tps,
                         "mfu": per_token * tps / cfg.hardware.peak_flops_per_worker,
                         "ratio": tps / measured[RUNS[0]], "first": out.get("first_step_s"),
                         "shape": f"{cfg.data.seq_len} x {cfg.trainer.micro_batch_size}, ZeRO-{cfg.hardware.zero_stage}"})
            print(f"gpu bench: {name}: {tps:,.0f} tokens/s", flush=True)
    section = render(args, rows, device, torch.__version__)
    write_section(args.results, section, SECTION)
    print(section)


def render(args, rows: list[dict], device: str, torch_version: str) -> str:
    lines = [f"## {SECTION}", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M')} with `python bench/gpu_bench.py --models "
             f"{' '.join(args.models)} --steps {args.steps}` on one {device} (torch {torch_version}). bf16, "
             f"one process, {args.steps} steps; tokens/s from the median {WINDOW}-step window after the first "
             "(lmforge train: its last window). MFU: 6N + attention FLOPs per token (model/flops.py) over "
             "989 TFLOP/s, the dense bf16 peak in conf/hardware/gpu-1.yaml.", "",
             "| model | seq x micro batch, ZeRO | run | tokens/s | MFU | vs plain loop | first step |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        first = f"{r['first']:.1f} s" if r["first"] else ""
        lines.append(f"| {r['model']} | {r['shape']} | {r['run']} | {r['tps']:,.0f} | {r['mfu']:.1%} | "
                     f"{r['ratio']:.2f}x | {first} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
