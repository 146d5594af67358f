"""The contract between the training loop and an objective (or fine-tuning task) module.

Each module in model/objectives/ defines one subclass of `Objective` holding its sample spec, collator,
loss and metrics; the registry in `model.objectives` maps `objective.name` to it. The loop only calls:

    spec = Cls.sample_spec(cfg)            # driver, before preparing data: how documents become samples
    objective = Cls(cfg, vocab, seed, tokenizer, world_size)   # every rank
    batch = objective.collate(samples, train=True)   # CPU tensors
    objective.tokens(batch)                # real (non-pad) tokens, for throughput and MFU
    loss = objective.loss(model, batch)    # scalar to backpropagate
    sums = objective.eval_sums(model, batch)   # additive statistics; summed over batches and ranks
    objective.metrics(sums)                # {"loss": ..., "perplexity": ..., "accuracy": ...}

Randomness (masks, noise, dropout views) comes only from `self.rng(sample, train)`, a generator seeded by
(seed, split, epoch, sample id): a sample gets the same mask on any number of workers and after a resume.
"""

import math
from collections.abc import Sequence

import numpy as np
import torch

from data.samples import SampleSpec

IGNORE_INDEX = -100  # HF's label value for positions that carry no loss


class Objective:
    name: str = ""
    head: str = ""  # the model head the builder must add: causal_lm, masked_lm, pretraining, seq2seq_lm, encoder
    families: tuple[str, ...] = ()  # model families it trains: decoder, encoder, encoder_decoder
    # The validation metric that picks the best checkpoint by default, and whether higher is better.
    selection_metric: str = "val/loss"
    selection_mode: str = "min"

    def __init__(self, cfg, vocab, seed: int, tokenizer=None, world_size: int = 1):
        """`cfg`: the ObjectiveConfig; `vocab`: data.prepared.Vocabulary (size and special ids); `tokenizer`:
        the prepared data's HF tokenizer, or None for bare token files; `world_size`: ranks training."""
        self.cfg, self.vocab, self.seed, self.tokenizer, self.world_size = cfg, vocab, seed, tokenizer, world_size

    @staticmethod
    def sample_spec(cfg) -> SampleSpec:
        return SampleSpec()

    @staticmethod
    def head_config(cfg, labels: Sequence[str]) -> dict:
        """Entries for the HF model config that the head needs (a fine-tuning task's labels); none here."""
        return {}

    def rng(self, sample: dict, train: bool) -> np.random.Generator:
        """The sample's own random stream: validation draws differ from training's, and are the same at
        every evaluation."""
        return np.random.default_rng([self.seed, 0 if train else 1, int(sample["epoch"]), int(sample["sample_id"])])

    def collate(self, samples: Sequence[dict], train: bool) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def tokens(self, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
        """(input tokens, decoder tokens) that are not padding; decoder tokens only for encoder-decoders."""
        mask = batch.get("attention_mask")
        return (int(mask.sum()) if mask is not None else batch["input_ids"].numel()), 0

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    def eval_sums(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError


def pad_stack(arrays: Sequence[np.ndarray], fill: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D arrays to the longest (or `length`): (int64 tensor, bool mask of real positions)."""
    lengths = torch.tensor([len(a) for a in arrays])
    longest = length or int(lengths.max())
    if (lengths == longest).all():
        return torch.from_numpy(np.stack(arrays).astype(np.int64, copy=False)), torch.ones(len(arrays), longest,
                                                                                           dtype=torch.bool)
    out = torch.full((len(arrays), longest), fill, dtype=torch.long)
    for row, a in zip(out, arrays):
        row[:len(a)] = torch.from_numpy(np.asarray(a, dtype=np.int64))
    return out, torch.arange(longest)[None, :] < lengths[:, None]


def token_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Summed cross-entropy, correct predictions and counted tokens over positions whose label is not
    IGNORE_INDEX (already aligned: no shifting here), in float64 for exact sums over many batches."""
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)
    counted = flat_labels != IGNORE_INDEX
    loss = torch.nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    correct = ((flat_logits.argmax(-1) == flat_labels) & counted).sum()
    return {"loss": loss.double(), "correct": correct.double(), "tokens": counted.sum().double()}


def next_token_loss_sums(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """token_loss_sums of a decoder: position t's logits predict label t + 1 (HF shifts inside forward)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return token_loss_sums(model(**inputs).logits[:, :-1], batch["labels"][:, 1:])


def perplexity_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Mean token loss and its perplexity from summed statistics (see token_loss_sums)."""
    loss = sums["loss"] / max(sums["tokens"], 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 30.0))}


def encoder_decoder_batch(inputs: Sequence[np.ndarray], targets: Sequence[np.ndarray], pad_id: int) -> dict:
    """Right-pad the inputs (masked out of attention) and the targets (IGNORE_INDEX: no loss). T5 builds its
    decoder inputs by shifting the labels right, turning IGNORE_INDEX into its pad token."""
    input_ids, real = pad_stack(inputs, pad_id)
    labels, _ = pad_stack(targets, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": real.long(), "labels": labels}


def encoder_decoder_tokens(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(real input tokens, target tokens) of an encoder-decoder batch."""
    return int(batch["attention_mask"].sum()), int((batch["labels"] != IGNORE_INDEX).sum())
