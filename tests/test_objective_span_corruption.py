"""T5 span corruption: noise density and span length, the sentinel round trip, per-sample determinism, and
the loss and metrics against a tiny T5ForConditionalGeneration."""

import numpy as np
import pytest
import torch
from model_helpers import check_loss_and_eval
from transformers import T5Config, T5ForConditionalGeneration

from common.errors import LmforgeError
from data.prepared import Vocabulary
from model.objectives.base import IGNORE_INDEX
from model.objectives.config import ObjectiveConfig
from model.objectives.span_corruption import SpanCorruption, corrupt, noise_mask

PAD, EOS, UNK = 0, 1, 2
SENTINELS = tuple(range(100, 200))
VOCAB = Vocabulary(size=200, bos_id=None, eos_id=EOS, pad_id=PAD, unk_id=UNK, special_ids=(PAD, EOS, UNK, *SENTINELS),
                   sentinel_ids=SENTINELS)


def runs(mask):
    """Lengths of the runs of True in a boolean array."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)


def restore(inputs, targets):
    """The original block, from the inputs with each sentinel replaced by the tokens after it in the targets."""
    assert inputs[-1] == EOS and targets[-1] == EOS
    spans, current = {}, None
    for token in targets[:-1]:
        if token in SENTINELS:
            current = spans.setdefault(int(token), [])
        else:
            current.append(int(token))
    return [t for token in inputs[:-1] for t in (spans[int(token)] if token in SENTINELS else [int(token)])]


def test_noise_density_and_mean_span_length_over_thousands_of_blocks():
    noised = total = 0
    lengths = []
    for i in range(3000):
        mask = noise_mask(128, 0.15, 3.0, np.random.default_rng(i))
        assert len(mask) == 128 and not mask[0], "a block starts with kept tokens"
        noised, total = noised + mask.sum(), total + len(mask)
        lengths.extend(runs(mask))
    # round(128 * 0.15) = 19 noise tokens in round(19 / 3) = 6 spans: a density of 0.148, spans of 3.17.
    assert abs(noised / total - 0.15) < 0.005
    assert abs(np.mean(lengths) - 3.0) < 0.25 and min(lengths) >= 1
    # Span lengths are random, not all the mean: a uniform split of 19 tokens into 6 spans.
    assert np.std(lengths) > 1.0 and max(lengths) >= 8


def test_inputs_and_targets_round_trip_to_the_block():
    rng = np.random.default_rng(0)
    for i in range(2000):
        block = rng.integers(3, 100, size=int(rng.integers(2, 160)))
        mask = noise_mask(len(block), 0.15, 3.0, np.random.default_rng(i))
        inputs, targets = corrupt(block, mask, SENTINELS, EOS)
        n_spans = len(runs(mask))
        assert list(inputs[np.isin(inputs, SENTINELS)]) == list(SENTINELS[:n_spans]), "sentinels in order"
        assert len(inputs) == len(block) - mask.sum() + n_spans + 1
        assert len(targets) == mask.sum() + n_spans + 1 and targets[0] == SENTINELS[0]
        assert restore(inputs, targets) == block.tolist()


def test_more_spans_than_sentinels_is_an_error():
    mask = np.tile([False, True], 6)
    with pytest.raises(LmforgeError, match="6 noise spans .* only 5 sentinel"):
        corrupt(np.arange(3, 15), mask, SENTINELS[:5], EOS)


def test_a_sample_is_noised_the_same_in_any_batch_and_anew_each_epoch():
    objective = SpanCorruption(ObjectiveConfig(name="span_corruption"), VOCAB, seed=5)
    rows = [{"input_ids": np.arange(3, 67, dtype=np.uint16) + i, "sample_id": i, "epoch": 0} for i in range(4)]
    alone = objective.collate(rows[2:3], train=True)
    together = objective.collate(rows, train=True)
    width = alone["input_ids"].shape[1]
    assert torch.equal(together["input_ids"][2, :width], alone["input_ids"][0])
    assert torch.equal(together["labels"][2, :alone["labels"].shape[1]], alone["labels"][0])
    later = objective.collate([{**rows[2], "epoch": 1}], train=True)
    assert not torch.equal(later["labels"], alone["labels"]) or not torch.equal(later["input_ids"], alone["input_ids"])


def tiny_t5():
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=200, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                               num_decoder_layers=1, num_heads=2, pad_token_id=PAD, eos_token_id=EOS,
                                               decoder_start_token_id=PAD))


def test_loss_has_grad_and_metrics_of_one_batch_equal_the_model_loss():
    model = tiny_t5()
    objective = SpanCorruption(ObjectiveConfig(name="span_corruption"), VOCAB, seed=0)
    rng = np.random.default_rng(1)
    # Unpacked documents of different lengths, so both inputs and labels are padded.
    rows = [{"input_ids": rng.integers(3, 100, size=n), "sample_id": i, "epoch": 0}
            for i, n in enumerate((20, 64, 33))]
    batch = objective.collate(rows, train=True)
    inputs, labels = objective.tokens(batch)
    assert inputs == int(batch["attention_mask"].sum()) < batch["input_ids"].numel()
    assert labels == int((batch["labels"] != IGNORE_INDEX).sum()) < batch["labels"].numel()
    metrics, _ = check_loss_and_eval(objective, model, batch)
    assert 0 <= metrics["accuracy"] <= 1


def test_needs_sentinels():
    with pytest.raises(LmforgeError, match="sentinel"):
        SpanCorruption(ObjectiveConfig(name="span_corruption"), Vocabulary(100, 1, 1, 0), seed=0)
