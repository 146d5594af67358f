"""Baseline training loops for bench/train_bench.py: plain PyTorch in one process, or DDP under torchrun.

Run alone it is the plain single-process loop; under `python -m torch.distributed.run --nproc_per_node N`
it wraps the same model in DistributedDataParallel over gloo. Either way it trains exactly what lmforge
trains (same HF model, AdamW hyperparameters, LR schedule, clipping and batches) with no DeepSpeed and no
Ray, and writes rank 0's per-step times to --out as JSON. With --deepspeed it instead steps lmforge's own
DeepSpeed engine (same config as `lmforge train`) under torchrun without Ray, which splits lmforge's gap to
DDP into DeepSpeed's share and Ray's.
"""

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from data.loader import ResumableLoader
from data.prepared import open_split, open_tokenizer
from model.gpt import build_model
from model.objectives import get_objective
from orchestrator.config import load_config
from orchestrator.engine import build_engine, lr_at, param_groups


def train_steps(cfg, prepared: str, rank: int, world_size: int, use_deepspeed: bool = False) -> list[float]:
    """Seconds per optimizer step, timed like lmforge's StepMeter: batch, forward, backward, update."""
    tr = cfg.trainer
    tokenizer = open_tokenizer(prepared)
    model = build_model(cfg.model, tokenizer, cfg.seed)
    objective = get_objective(cfg.objective.name)
    loader = ResumableLoader(open_split(prepared, "train"), tr.micro_batch_size, rank, world_size, cfg.seed,
                             cfg.data.shuffle)
    if use_deepspeed:
        step = deepspeed_step(build_engine(model, cfg, world_size), loader, objective, tr, tokenizer.pad_token_id)
    else:
        step = torch_step(model, loader, objective, tr, world_size)
    times = []
    for _ in range(tr.max_steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return times


def torch_step(model, loader: ResumableLoader, objective, tr, world_size: int):
    optimizer = torch.optim.AdamW(param_groups(model, tr.weight_decay), lr=tr.lr, betas=(tr.beta1, tr.beta2),
                                  eps=1e-8)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, tr) / tr.lr)
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    model.train()

    def step() -> None:
        loss = objective.loss(model, objective.collate(loader.next_batch()))
        loss.backward()
        if tr.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tr.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    return step


def deepspeed_step(engine, loader: ResumableLoader, objective, tr, pad_id: int):
    """lmforge's own per-worker step function, minus Ray."""
    from orchestrator.worker import train_step

    # .item() as the plain loop does: each timed step ends when the device has finished it.
    return lambda: train_step(engine, loader, objective, tr.gradient_accumulation_steps, pad_id).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", required=True, help="prepared data directory")
    parser.add_argument("--threads", type=int, required=True, help="torch threads per process")
    parser.add_argument("--out", required=True, help="JSON file for rank 0's step times")
    parser.add_argument("--deepspeed", action="store_true", help="step lmforge's DeepSpeed engine instead")
    parser.add_argument("overrides", nargs="*", help="the lmforge overrides the bench uses")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1:
        dist.init_process_group("gloo")
    cfg = load_config(args.overrides)
    times = train_steps(cfg, args.prepared, rank, world_size, args.deepspeed)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"step_times": times, "world_size": world_size, "threads": torch.get_num_threads()}, f)
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
