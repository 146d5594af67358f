"""Causal language modelling: the collator, loss and metrics for next-token prediction."""

import math

import torch


def collate(blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    # HF causal LMs shift labels inside forward(), so input and label are the same block.
    return {"input_ids": blocks, "labels": blocks}


def loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss


def metrics(mean_loss: float) -> dict[str, float]:
    return {"loss": mean_loss, "perplexity": math.exp(min(mean_loss, 30.0))}
