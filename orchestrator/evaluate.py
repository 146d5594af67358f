"""Evaluate a fine-tuning task on every validation sample exactly once, across any number of ranks.

Rank r takes the r-th contiguous slice of the split and predicts it in micro-batches; every rank runs the
same number of batches (a rank whose slice is used up runs its first sample again and discards the result),
because under ZeRO-3 each forward pass gathers parameters with collectives that every rank must join, and
generation with synced_gpus needs the same. Loss statistics are summed and all-reduced as for pretraining;
predictions are gathered to every rank, ordered by sample id, and scored once on rank 0 by the task's
metrics (scikit-learn, seqeval, sacrebleu, ...), whose result rank 0 broadcasts so every rank decides early
stopping alike. Batching never changes the result: the same checkpoint scores the same on 1 or N ranks.
"""

import math

import torch
import torch.distributed as dist


def rank_slices(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """The sample ids of each of this rank's batches; every rank gets the same number of batches, some of
    which may be empty."""
    per_rank = math.ceil(num_samples / world_size)
    mine = list(range(rank * per_rank, min((rank + 1) * per_rank, num_samples)))
    n_batches = max(1, math.ceil(per_rank / batch_size))
    return [mine[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]


@torch.no_grad()
def evaluate_task(model, task, store, references: list, batch_size: int, device, rank: int = 0,
                  world_size: int = 1) -> dict[str, float]:
    """The task's validation metrics (loss and its own), without the "val/" prefix. `model` is a DeepSpeed
    engine on a worker or a plain HF model (lmforge eval); collectives are used only when a process group
    is up."""
    from orchestrator.worker import to_device

    model.eval()
    distributed = dist.is_available() and dist.is_initialized() and world_size > 1
    sums: dict[str, torch.Tensor] = {}
    predictions: list[tuple[int, dict]] = []
    for ids in rank_slices(len(store), batch_size, rank, world_size):
        real = bool(ids)
        samples = [store[i] | {"sample_id": i, "epoch": 0} for i in (ids or [0])]
        batch = to_device(task.collate(samples, train=False), device)
        for key, value in task.eval_sums(model, batch).items():
            sums[key] = sums.get(key, 0) + value.double() * real  # a padding batch adds zeros
        outputs = task.predict(model, batch, samples)
        if real:
            predictions.extend(zip(ids, outputs))
    keys = sorted(sums)
    totals = torch.stack([torch.as_tensor(sums[k], device=device) for k in keys])
    if distributed:
        dist.all_reduce(totals)
        everyone = [None] * world_size
        dist.all_gather_object(everyone, predictions)
        predictions = [p for part in everyone for p in part]
    metrics = task.metrics(dict(zip(keys, totals.tolist())))
    result = [None]
    if rank == 0:
        predictions.sort(key=lambda pair: pair[0])
        result[0] = metrics | task.score([p for _, p in predictions], references)
    if distributed:
        dist.broadcast_object_list(result, src=0)
    return result[0]
