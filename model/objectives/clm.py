"""Causal language modelling: the collator, loss and metrics for next-token prediction."""

import math

import torch

IGNORE_INDEX = -100  # HF's label value for positions that carry no loss


def collate(blocks: torch.Tensor, pad_id: int | None = None) -> dict[str, torch.Tensor]:
    # HF causal LMs shift labels inside forward(), so input and label are the same block. Packed blocks never
    # contain the pad token; unpacked documents are right-padded, and padding must neither attend nor count.
    labels = blocks.clone()
    batch = {"input_ids": blocks, "labels": labels}
    if pad_id is not None:
        padding = blocks == pad_id
        if padding.any():
            labels[padding] = IGNORE_INDEX
            batch["attention_mask"] = (~padding).long()
    return batch


def loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def metrics(mean_loss: float) -> dict[str, float]:
    return {"loss": mean_loss, "perplexity": math.exp(min(mean_loss, 30.0))}
