"""Helpers for the task tests: a short plain-PyTorch training loop and scoring without Ray or DeepSpeed,
to check that a task's samples, collator and loss can teach a tiny model."""

import numpy as np
import torch


def fit(task, model, samples: list, steps: int, lr: float = 1e-3, batch_size: int = 16, seed: int = 0):
    """`steps` AdamW steps on random batches of `samples` (without replacement within a batch)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(steps):
        batch = task.collate([samples[i] for i in rng.choice(len(samples), size=batch_size, replace=False)],
                             train=True)
        optimizer.zero_grad()
        task.loss(model, batch).backward()
        optimizer.step()
    model.eval()
    return model


def predict_all(task, model, samples: list, batch_size: int = 16) -> list[dict]:
    """The task's predictions for every sample, in order."""
    with torch.no_grad():
        return [p for start in range(0, len(samples), batch_size)
                for p in task.predict(model, task.collate(samples[start:start + batch_size], train=False),
                                      samples[start:start + batch_size])]


def eval_metric(task, model, batch, key: str) -> float:
    """One of the task's loss metrics (loss, perplexity) on `batch`, in eval mode; the model is left training."""
    model.eval()
    with torch.no_grad():
        sums = task.eval_sums(model, batch)
    model.train()
    return task.metrics({k: v.item() for k, v in sums.items()})[key]
