"""Baseline training loops for bench/train_bench.py: plain PyTorch in one process, or DDP under torchrun.

Run alone it is the plain single-process loop; under `python -m torch.distributed.run --nproc_per_node N`
it wraps the same model in DistributedDataParallel over gloo. Either way it trains exactly what lmforge
trains (same HF model, AdamW hyperparameters, LR schedule, clipping and batches) with no DeepSpeed and no
Ray, and writes rank 0's per-step times to --out as JSON. With --deepspeed it instead steps lmforge's own
DeepSpeed engine (same config as `lmforge train`) under torchrun without Ray, which splits lmforge's gap to
DDP into DeepSpeed's share and Ray's.

With `hardware.use_gpu=true` both run on the rank's GPU. The plain loop then does what a careful user of
plain PyTorch would: bf16 autocast over fp32 weights (for `hardware.precision=bf16`) and fused AdamW.
Like lmforge, both loops read the loss (and so wait for the device) only at the end of each logging
window; a step's time is when the host finished it, so only whole windows are meaningful.
"""

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from data.loader import ResumableLoader
from data.prepared import open_split, read_vocabulary
from model.build import build_model
from model.objectives import get_objective
from orchestrator.config import load_config
from orchestrator.engine import build_engine, lr_at, param_groups


def make_step(cfg, prepared: str, rank: int, world_size: int, device: torch.device, use_deepspeed: bool = False):
    """A function that runs one optimizer step of the plain loop, or of lmforge's engine, and returns the
    loss still on the device."""
    tr = cfg.trainer
    vocab = read_vocabulary(prepared)
    model = build_model(cfg.model, vocab.size, cfg.seed, bos_id=vocab.bos_id, eos_id=vocab.eos_id, pad_id=vocab.pad_id)
    objective = get_objective(cfg.objective.name)(cfg.objective, vocab, cfg.seed, world_size=world_size)
    loader = ResumableLoader(open_split(prepared, "train"), tr.micro_batch_size, rank, world_size, cfg.seed,
                             cfg.data.shuffle)
    if use_deepspeed:
        return deepspeed_step(build_engine(model, cfg, world_size), loader, objective, tr)
    return torch_step(model.to(device), loader, objective, tr, world_size, device, cfg.hardware.precision)


def train_steps(cfg, prepared: str, rank: int, world_size: int, device: torch.device,
                use_deepspeed: bool = False) -> list[float]:
    """Seconds per optimizer step, timed like lmforge's StepMeter: batch, forward, backward, update."""
    tr = cfg.trainer
    step = make_step(cfg, prepared, rank, world_size, device, use_deepspeed)
    times = []
    for i in range(tr.max_steps):
        started = time.perf_counter()
        loss = step()
        if (i + 1) % tr.log_every == 0 or i + 1 == tr.max_steps:
            loss.item()
        times.append(time.perf_counter() - started)
    return times


def torch_step(model, loader: ResumableLoader, objective, tr, world_size: int, device: torch.device,
               precision: str):
    optimizer = torch.optim.AdamW(param_groups(model, tr.weight_decay), lr=tr.lr, betas=(tr.beta1, tr.beta2),
                                  eps=1e-8, fused=device.type == "cuda")
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, tr) / tr.lr)
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    model.train()
    from orchestrator.worker import to_device

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)

    def step() -> torch.Tensor:
        # the worker's own collation and transfer to the device
        batch = to_device(objective.collate(loader.next_batch(), train=True), device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = objective.loss(model, batch)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if tr.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tr.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def deepspeed_step(engine, loader: ResumableLoader, objective, tr):
    """lmforge's own per-worker step function, minus Ray."""
    from orchestrator.worker import train_step

    return lambda: train_step(engine, loader, objective, tr.gradient_accumulation_steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", required=True, help="prepared data directory")
    parser.add_argument("--threads", type=int, required=True, help="torch threads per process")
    parser.add_argument("--out", required=True, help="JSON file for rank 0's step times")
    parser.add_argument("--deepspeed", action="store_true", help="step lmforge's DeepSpeed engine instead")
    parser.add_argument("overrides", nargs="*", help="the lmforge overrides the bench uses")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.overrides)
    # Alone (no torchrun) the DeepSpeed engine still wants a process group: a group of one.
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29534"}.items():
        os.environ.setdefault(key, value)
    world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    device = torch.device("cpu")
    if cfg.hardware.use_gpu:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if world_size > 1 or args.deepspeed:
        dist.init_process_group(cfg.hardware.backend)
    times = train_steps(cfg, args.prepared, rank, world_size, device, args.deepspeed)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"step_times": times, "world_size": world_size, "threads": torch.get_num_threads()}, f)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
