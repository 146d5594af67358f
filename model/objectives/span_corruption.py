"""T5's span corruption: noised spans of a block become sentinels in the encoder input, and the decoder
predicts each sentinel followed by the tokens it hides.

Noise is drawn at collate time from the sample's own generator, so every epoch sees new spans while a given
(seed, epoch, sample) gets the same ones on any worker count and after a resume.
"""

from collections.abc import Sequence

import numpy as np
import torch

from common.errors import LmforgeError
from data.samples import SampleSpec
from model.objectives.base import (
    Objective,
    encoder_decoder_batch,
    encoder_decoder_tokens,
    perplexity_metrics,
    token_loss_sums,
)

MAX_SENTINELS = 100  # T5's <extra_id_0> ... <extra_id_99>


def random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of `num_segments` positive segments summing to `num_items`, uniformly over such splits:
    choose the segments' num_segments - 1 inner boundaries among the num_items - 1 gaps."""
    cuts = np.sort(rng.choice(num_items - 1, size=num_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [num_items]]))


def noise_mask(length: int, noise_density: float, mean_span_length: float, rng: np.random.Generator) -> np.ndarray:
    """Which of `length` tokens to noise, as T5's random_spans_noise_mask: round(length * density) noise
    tokens in round(noise / mean_span_length) spans, noise and kept lengths each split at random, and the
    spans interleaved starting with kept tokens (so the block never begins with a sentinel).

    The span count is also capped at the number of kept tokens, since each span needs a kept run before it;
    T5 leaves that to the caller, and density > 0.5 with short spans would otherwise fail. A block of fewer
    than two tokens has nothing to keep and nothing to noise around, and is left whole.
    """
    if length < 2:
        return np.zeros(length, dtype=bool)
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_kept = length - num_noise
    num_spans = min(max(int(round(num_noise / mean_span_length)), 1), num_kept)
    noise_lengths = random_segmentation(num_noise, num_spans, rng)
    kept_lengths = random_segmentation(num_kept, num_spans, rng)
    runs = np.stack([kept_lengths, noise_lengths], axis=1).reshape(-1)
    return np.repeat(np.arange(2 * num_spans) % 2 == 1, runs)


def corrupt(ids: np.ndarray, mask: np.ndarray, sentinel_ids: Sequence[int], eos_id: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """(encoder inputs, decoder targets) for one block: in the inputs the i-th noised span is replaced by
    sentinel_ids[i]; the targets are each span's sentinel followed by its tokens. Both end with eos_id."""
    ids, mask = np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)
    span_start = mask & ~np.concatenate([[False], mask[:-1]])
    num_spans = int(span_start.sum())
    if num_spans > len(sentinel_ids):
        raise LmforgeError(f"a block of {len(ids)} tokens has {num_spans} noise spans but the tokenizer has only "
                           f"{len(sentinel_ids)} sentinel tokens; lower data.seq_len or objective.noise_density, "
                           "or raise objective.mean_span_length")
    sentinels = np.asarray(sentinel_ids, dtype=np.int64)[: max(num_spans, 1)]
    span_of = np.cumsum(span_start) - 1  # at noise positions: which span they belong to
    with_sentinels = ids.copy()
    with_sentinels[span_start] = sentinels[span_of[span_start]]
    # Inputs: kept tokens, plus each span's first position now holding its sentinel.
    inputs = with_sentinels[~mask | span_start]
    # Targets: the same sentinels, each followed by the tokens it replaced in the inputs.
    starts = np.flatnonzero(span_start)
    targets = np.insert(ids[mask], np.searchsorted(np.flatnonzero(mask), starts), sentinels[:num_spans])
    return np.append(inputs, eos_id), np.append(targets, eos_id)


class SpanCorruption(Objective):
    name, head, families = "span_corruption", "seq2seq_lm", ("encoder_decoder",)

    def __init__(self, cfg, vocab, seed: int, tokenizer=None, world_size: int = 1):
        super().__init__(cfg, vocab, seed, tokenizer, world_size)
        if not vocab.sentinel_ids or vocab.eos_id is None:
            raise LmforgeError("objective span_corruption needs sentinel tokens (<extra_id_N>) and an eos token in "
                               "the prepared data's tokenizer; prepare the data again with this objective")
        self.pad_id = vocab.pad_id if vocab.pad_id is not None else 0

    @staticmethod
    def sample_spec(cfg) -> SampleSpec:
        return SampleSpec(kind="blocks", separator="eos", sentinels=MAX_SENTINELS)

    def corrupt(self, sample: dict, train: bool) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(sample["input_ids"], dtype=np.int64)
        mask = noise_mask(len(ids), self.cfg.noise_density, self.cfg.mean_span_length, self.rng(sample, train))
        return corrupt(ids, mask, self.vocab.sentinel_ids, self.vocab.eos_id)

    def collate(self, samples: Sequence[dict], train: bool = True) -> dict[str, torch.Tensor]:
        pairs = [self.corrupt(s, train) for s in samples]
        return encoder_decoder_batch([inputs for inputs, _ in pairs], [targets for _, targets in pairs], self.pad_id)

    def tokens(self, batch):
        return encoder_decoder_tokens(batch)

    def eval_sums(self, model, batch):
        return token_loss_sums(model(**batch).logits, batch["labels"])

    def metrics(self, sums):
        return perplexity_metrics(sums) | {"accuracy": sums["correct"] / max(sums["tokens"], 1.0)}
