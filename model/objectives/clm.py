"""Causal language modelling: the collator, loss and metrics for next-token prediction."""

import math
from collections.abc import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100  # HF's label value for positions that carry no loss


def collate(samples: Sequence[np.ndarray], pad_id: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad token arrays to the longest one in the batch; padding neither attends nor carries loss.

    Which positions are padding comes from the samples' lengths, never from token values: a tokenizer
    without a pad token (GPT-2's) or a token file whose vocabulary is all text has no id that is safe to
    treat as padding, and the end-of-text separator must keep its loss so the model learns to end a document.
    The fill value only has to be a valid embedding row: `pad_id` when the tokenizer has one, else 0.
    """
    lengths = torch.tensor([len(s) for s in samples])
    longest = int(lengths.max())
    # HF causal LMs shift labels inside forward(), so input and label are the same block.
    if (lengths == longest).all():  # packed blocks: nothing to pad
        input_ids = torch.from_numpy(np.stack(samples).astype(np.int64, copy=False))
        return {"input_ids": input_ids, "labels": input_ids.clone()}
    input_ids = torch.full((len(samples), longest), pad_id if pad_id is not None else 0, dtype=torch.long)
    for row, sample in zip(input_ids, samples):
        row[:len(sample)] = torch.from_numpy(np.asarray(sample, dtype=np.int64))
    real = torch.arange(longest)[None, :] < lengths[:, None]
    labels = input_ids.masked_fill(~real, IGNORE_INDEX)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": real.long()}


def loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def metrics(mean_loss: float) -> dict[str, float]:
    return {"loss": mean_loss, "perplexity": math.exp(min(mean_loss, 30.0))}
