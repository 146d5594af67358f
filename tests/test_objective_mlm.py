"""Masked LM: the masking rate and its 80/10/10 split, special tokens, whole words, per-sample determinism,
and the loss and metrics against a tiny BertForMaskedLM."""

import numpy as np
import pytest
import torch
from model_helpers import check_loss_and_eval
from transformers import BertConfig, BertForMaskedLM

from common.errors import LmforgeError
from data.config import TokenizerConfig
from data.prepared import Vocabulary
from data.tokenizer import train_tokenizer
from model.objectives.base import IGNORE_INDEX
from model.objectives.config import ObjectiveConfig
from model.objectives.mlm import MaskedLM, mask_tokens, word_start_table

PAD, UNK, CLS, SEP, MASK, EOS = range(6)
VOCAB = Vocabulary(size=100, bos_id=EOS, eos_id=EOS, pad_id=PAD, mask_id=MASK, cls_id=CLS, sep_id=SEP, unk_id=UNK,
                   special_ids=(0, 1, 2, 3, 4, 5))
SPECIAL = np.arange(6)


def made_up_text(n, seed=0):
    """Sentences of made-up words from a few syllables: too many words for a 300-token vocabulary, so
    most become several subword pieces."""
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qu", "ish"]
    words = ["".join(rng.choice(syllables, size=rng.integers(1, 5))) for _ in range(400)]
    return [" ".join(rng.choice(words, size=12)).capitalize() + "." for _ in range(n)]


TEXT = made_up_text(200)


def blocks(n, length=128, seed=0):
    """Wrapped blocks like BlockBuilder's: [CLS] text [SEP] text ... [SEP], with [SEP] between documents."""
    rng = np.random.default_rng(seed)
    out = rng.integers(6, 100, size=(n, length))
    out[:, 0], out[:, -1] = CLS, SEP
    out[rng.random((n, length)) < 0.03] = SEP
    return out


def sample(ids, sample_id, epoch=0):
    return {"input_ids": np.asarray(ids, dtype=np.uint16), "sample_id": sample_id, "epoch": epoch}


def test_selection_rate_is_exact_per_sample_and_the_split_is_80_10_10():
    selected = candidates = masked = randomised = kept = 0
    for i, ids in enumerate(blocks(3000)):
        inputs, labels = mask_tokens(ids, np.random.default_rng(i), SPECIAL, MASK, 100, 0.15)
        chosen = labels != IGNORE_INDEX
        n_candidates = int((ids >= 6).sum())
        assert chosen.sum() == round(0.15 * n_candidates), "the rate is exact in every sample"
        assert (labels[chosen] == ids[chosen]).all() and (inputs[~chosen] == ids[~chosen]).all()
        assert not np.isin(inputs[chosen & (inputs != MASK)], SPECIAL).any(), "random ids are never special"
        selected, candidates = selected + chosen.sum(), candidates + n_candidates
        masked += (inputs[chosen] == MASK).sum()
        kept += (inputs[chosen] == ids[chosen]).sum()
        randomised += ((inputs[chosen] != MASK) & (inputs[chosen] != ids[chosen])).sum()
    assert abs(selected / candidates - 0.15) < 0.002
    # 57k selected tokens: three standard deviations of a 10% share are about 0.004. A random draw equal to
    # the original (1 in 94) counts as kept.
    assert abs(masked / selected - 0.8) < 0.01
    assert abs(randomised / selected - 0.1 * 93 / 94) < 0.006
    assert abs(kept / selected - (0.1 + 0.1 / 94)) < 0.006


def test_special_tokens_and_padding_are_never_selected():
    objective = MaskedLM(ObjectiveConfig(name="mlm"), VOCAB, seed=1)
    rows = [sample(ids[: 20 + i % 100], i) for i, ids in enumerate(blocks(500))]
    batch = objective.collate(rows, train=True)
    ids = torch.full_like(batch["input_ids"], PAD)
    for row, s in zip(ids, rows):
        row[:len(s["input_ids"])] = torch.from_numpy(s["input_ids"].astype(np.int64))
    special = torch.isin(ids, torch.from_numpy(SPECIAL)) | (batch["attention_mask"] == 0)
    assert (batch["labels"][special] == IGNORE_INDEX).all()
    assert torch.equal(batch["input_ids"][special], ids[special]), "[CLS], [SEP] and padding stay as they are"
    assert (batch["labels"][~special] != IGNORE_INDEX).float().mean().item() == pytest.approx(0.15, abs=0.005)
    assert "token_type_ids" not in batch


def test_a_sample_gets_the_same_mask_in_any_batch_and_a_new_one_each_epoch():
    objective = MaskedLM(ObjectiveConfig(name="mlm"), VOCAB, seed=7)
    data = blocks(9)
    alone = objective.collate([sample(data[4], 4)], train=True)
    # The same sample as the second of two (one rank's share of 2 workers) and the fifth of nine (1 worker).
    in_two = objective.collate([sample(data[3], 3), sample(data[4], 4)], train=True)
    in_nine = objective.collate([sample(ids, i) for i, ids in enumerate(data)], train=True)
    for batch, row in ((in_two, 1), (in_nine, 4)):
        assert torch.equal(batch["input_ids"][row], alone["input_ids"][0])
        assert torch.equal(batch["labels"][row], alone["labels"][0])
    next_epoch = objective.collate([sample(data[4], 4, epoch=1)], train=True)
    assert not torch.equal(next_epoch["labels"], alone["labels"])
    validation = objective.collate([sample(data[4], 4)], train=False)
    assert not torch.equal(validation["labels"], alone["labels"])
    assert torch.equal(objective.collate([sample(data[4], 4)], train=False)["labels"], validation["labels"])


@pytest.fixture(scope="module")
def wordpiece():
    return train_tokenizer(TEXT, TokenizerConfig(kind="wordpiece", vocab_size=300, min_frequency=1))


def test_whole_word_masking_selects_every_piece_of_a_word(wordpiece):
    vocab = Vocabulary(len(wordpiece), wordpiece.eos_token_id, wordpiece.eos_token_id, wordpiece.pad_token_id,
                       mask_id=wordpiece.mask_token_id, special_ids=tuple(wordpiece.all_special_ids))
    objective = MaskedLM(ObjectiveConfig(name="mlm", whole_word_mask=True), vocab, seed=3, tokenizer=wordpiece)
    ids = np.array(wordpiece(" ".join(TEXT[:10]))["input_ids"])
    pieces = wordpiece.convert_ids_to_tokens(ids.tolist())
    words = np.cumsum([not p.startswith("##") for p in pieces])
    assert len(set(words.tolist())) < len(ids), "the text has words of several pieces"
    selected = candidates = 0
    for i in range(2000):
        _, labels = objective.mask(sample(ids, i), train=True)
        chosen = labels != IGNORE_INDEX
        for word in np.unique(words[chosen]):
            assert chosen[words == word].all(), f"sample {i}: only part of word {word} was selected"
        selected, candidates = selected + chosen.sum(), candidates + len(ids)
    # Whole words fill the budget from below, so the rate is at most, and close to, 15%.
    assert 0.13 < selected / candidates <= 0.15


def test_word_starts_follow_each_tokenizer_convention(wordpiece):
    for kind, marker in (("byte_bpe", "Ġ"), ("unigram", "▁")):
        tok = train_tokenizer(TEXT, TokenizerConfig(kind=kind, vocab_size=300, min_frequency=1))
        table = word_start_table(tok, len(tok))
        for token, i in tok.get_vocab().items():
            assert table[i] == (token.startswith(marker) or i in tok.all_special_ids), (kind, token)
    table = word_start_table(wordpiece, len(wordpiece) + 5)
    assert table[wordpiece.convert_tokens_to_ids("##n")] == np.False_ and table[-5:].all()


def test_whole_word_masking_without_a_tokenizer_is_a_clear_error():
    with pytest.raises(LmforgeError, match="whole_word_mask"):
        MaskedLM(ObjectiveConfig(name="mlm", whole_word_mask=True), VOCAB, seed=0)
    with pytest.raises(LmforgeError, match="mask token"):
        MaskedLM(ObjectiveConfig(name="mlm"), Vocabulary(100, 5, 5, 0), seed=0)


def tiny_bert(cls):
    torch.manual_seed(0)
    return cls(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32, max_position_embeddings=160, pad_token_id=PAD))


def test_loss_has_grad_and_metrics_of_one_batch_equal_the_model_loss():
    model = tiny_bert(BertForMaskedLM)
    objective = MaskedLM(ObjectiveConfig(name="mlm"), VOCAB, seed=0)
    batch = objective.collate([sample(ids[: 40 + 20 * i], i) for i, ids in enumerate(blocks(4))], train=True)
    assert batch["attention_mask"][0].sum() == 40 and objective.tokens(batch) == (40 + 60 + 80 + 100, 0)
    metrics, _ = check_loss_and_eval(objective, model, batch)
    assert metrics["perplexity"] == pytest.approx(np.exp(metrics["loss"]), rel=1e-5) and 0 <= metrics["accuracy"] <= 1
