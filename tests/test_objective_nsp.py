"""Sentence splitting, BERT next-sentence pairs and one-sentence samples (data.segments), and the mlm_nsp
objective's collate, loss and metrics against a tiny BertForPreTraining."""

import numpy as np
import pytest
import torch
from model_helpers import check_loss_and_eval
from transformers import BertConfig, BertForPreTraining

from data.prepared import Vocabulary
from data.segments import PairBuilder, SegmentBuilder, split_sentences
from model.objectives.base import IGNORE_INDEX
from model.objectives.config import ObjectiveConfig
from model.objectives.mlm_nsp import MaskedLMWithNSP

CLS, SEP = 2, 3


def corpus(n_documents, sentence_lengths=(3, 30), sentences=(1, 12), seed=0):
    """Documents as lists of sentences whose tokens count up from 10 through the whole corpus, so a token
    tells which document it came from and where."""
    rng = np.random.default_rng(seed)
    documents, next_token = [], 10
    for _ in range(n_documents):
        doc = []
        for length in rng.integers(*sentence_lengths, size=rng.integers(*sentences)):
            doc.append(np.arange(next_token, next_token + length))
            next_token += length
        documents.append(doc)
    return documents


def feed(builder, documents, batch_documents=7):
    """Documents to the builder as preparation does: pieces back to back, a batch of documents at a time."""
    samples = []
    for start in range(0, len(documents), batch_documents):
        pieces = [(s, i < len(doc) - 1) for doc in documents[start:start + batch_documents] for i, s in enumerate(doc)]
        flat = np.concatenate([s for s, _ in pieces]).astype(np.uint32)  # a memory-mapped dtype
        samples.extend(builder.add(flat, np.array([len(s) for s, _ in pieces]), np.array([c for _, c in pieces])))
    rest, dropped = builder.finish()
    return samples + rest, dropped


def document_of(documents):
    owner = {int(t): d for d, doc in enumerate(documents) for s in doc for t in s}
    return lambda tokens: {owner[int(t)] for t in tokens}


def test_split_sentences():
    text = 'It rained. Then it stopped! Was it 3 p.m.? 4 o\'clock. e.g. this stays. "Quoted." Next\nline two'
    assert split_sentences(text) == ["It rained.", "Then it stopped!", "Was it 3 p.m.?", "4 o'clock. e.g. this stays.",
                                     '"Quoted."', "Next", "line two"]
    assert split_sentences("\n\n  \n") == [] and split_sentences("no end") == ["no end"]


def test_pairs_are_half_random_fit_the_sequence_and_carry_the_right_types():
    documents = corpus(3000)
    of = document_of(documents)
    seq_len = 64
    samples, dropped = feed(PairBuilder(seq_len, CLS, SEP, random_next_prob=0.5, short_seq_prob=0.1, seed=0),
                            documents)
    assert len(samples) > 2000
    labels = np.array([s["next_sentence_label"][0] for s in samples])
    # Plain BERT gives 62% random pairs here (every one-sentence chunk is random); see PairBuilder.
    assert abs(labels.mean() - 0.5) < 0.02, labels.mean()
    used = 0
    for s in samples:
        ids, types = s["input_ids"], s["token_type_ids"]
        assert len(ids) <= seq_len and ids[0] == CLS and ids[-1] == SEP and (ids == SEP).sum() == 2
        second = int(np.flatnonzero(ids == SEP)[0]) + 1
        a, b = ids[1:second - 1], ids[second:-1]
        assert len(a) >= 1 and len(b) >= 1
        assert (types[:second] == 0).all() and (types[second:] == 1).all()
        assert s["token_type_ids"].dtype == np.uint8 and s["next_sentence_label"].shape == (1,)
        (doc_a,) = of(a)
        if s["next_sentence_label"][0] == 0:
            assert of(b) == {doc_a} and b[0] > a[-1], "B continues A in the same document"
        else:
            assert max(of(b)) < doc_a, "a random B comes from an earlier document"
        used += len(a) + (len(b) if s["next_sentence_label"][0] == 0 else 0)
    # Each of the corpus's tokens is in one pair (as A or as a true B) or counted as dropped (truncated, or a
    # one-sentence first document); a random B repeats another document's tokens.
    assert used + dropped == sum(len(s) for doc in documents for s in doc)


def test_long_sentences_are_truncated_to_the_budget_from_both_ends():
    documents = corpus(400, sentence_lengths=(40, 200), sentences=(1, 5), seed=1)
    samples, dropped = feed(PairBuilder(48, CLS, SEP, seed=2), documents)
    assert dropped > 0
    lengths = [len(s["input_ids"]) for s in samples]
    assert max(lengths) == 48 and np.mean(np.array(lengths) == 48) > 0.8
    # Truncation keeps a contiguous run of each side, cut at the front in some pairs and the back in others.
    starts_cut = ends_cut = 0
    first = {int(s[0]) for doc in documents for s in doc}
    last = {int(s[-1]) for doc in documents for s in doc}
    for s in samples:
        second = int(np.flatnonzero(s["input_ids"] == SEP)[0]) + 1
        a, b = s["input_ids"][1:second - 1], s["input_ids"][second:-1]
        assert (np.diff(a) == 1).all() and (np.diff(b) == 1).all()
        starts_cut += int(a[0]) not in first
        ends_cut += int(a[-1]) not in last
    assert starts_cut > 50 and ends_cut > 50


def test_same_seed_same_pairs_whatever_the_batches():
    documents = corpus(200, seed=3)
    one, _ = feed(PairBuilder(64, CLS, SEP, seed=4), documents, batch_documents=1)
    many, _ = feed(PairBuilder(64, CLS, SEP, seed=4), documents, batch_documents=50)
    other, _ = feed(PairBuilder(64, CLS, SEP, seed=5), documents, batch_documents=50)
    assert [s["input_ids"].tolist() for s in one] == [s["input_ids"].tolist() for s in many]
    assert [s["input_ids"].tolist() for s in one] != [s["input_ids"].tolist() for s in other]


def test_the_first_document_pairs_with_its_own_next_sentences():
    samples, dropped = feed(PairBuilder(64, CLS, SEP, random_next_prob=1.0, seed=0), corpus(1, sentences=(6, 7)))
    assert samples and all(s["next_sentence_label"][0] == 0 for s in samples)
    alone, dropped = feed(PairBuilder(64, CLS, SEP, seed=0), [[np.arange(10, 20)]])
    assert alone == [] and dropped == 10, "one sentence and no earlier document: nothing to pair"


def test_segment_builder_wraps_cuts_and_drops_short_pieces():
    builder = SegmentBuilder(8, CLS, SEP, min_tokens=4)
    flat = np.arange(10, 10 + 3 + 5 + 9)
    samples = builder.add(flat, np.array([3, 5, 9]), np.array([True, True, False]))
    assert [s["input_ids"].tolist() for s in samples] == [[CLS, 13, 14, 15, 16, 17, SEP],
                                                          [CLS, 18, 19, 20, 21, 22, 23, SEP]]
    assert builder.finish() == ([], 3 + 3)


VOCAB = Vocabulary(size=100, bos_id=5, eos_id=5, pad_id=0, mask_id=4, cls_id=CLS, sep_id=SEP, unk_id=1,
                   special_ids=(0, 1, 2, 3, 4, 5))


def pair_samples(n):
    documents = corpus(60, sentence_lengths=(3, 12), seed=6)
    documents = [[s % 94 + 6 for s in doc] for doc in documents]  # into the tiny vocabulary, past the specials
    samples, _ = feed(PairBuilder(32, CLS, SEP, seed=7), documents)
    return [{**s, "input_ids": s["input_ids"].astype(np.uint16), "sample_id": i, "epoch": 0}
            for i, s in enumerate(samples[:n])]


def test_sample_spec_carries_the_pair_shares():
    spec = MaskedLMWithNSP.sample_spec(ObjectiveConfig(name="mlm_nsp", random_next_prob=0.3, short_seq_prob=0.0))
    assert (spec.kind, spec.segments, spec.random_next_prob, spec.short_seq_prob) == ("pairs", "sentences", 0.3, 0.0)


def test_collate_never_masks_cls_or_sep_and_stacks_the_labels():
    objective = MaskedLMWithNSP(ObjectiveConfig(name="mlm_nsp"), VOCAB, seed=0)
    samples = pair_samples(40)
    batch = objective.collate(samples, train=True)
    assert batch["next_sentence_label"].shape == (40,) and batch["next_sentence_label"].dtype == torch.long
    assert batch["token_type_ids"].shape == batch["input_ids"].shape
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        original = torch.from_numpy(s["input_ids"].astype(np.int64))
        frame = (original == CLS) | (original == SEP)
        assert torch.equal(batch["input_ids"][row, :n][frame], original[frame])
        assert (batch["labels"][row, :n][frame] == IGNORE_INDEX).all()
        assert batch["token_type_ids"][row, :n].tolist() == s["token_type_ids"].tolist()
        assert (batch["token_type_ids"][row, n:] == 0).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()


def test_loss_has_grad_and_metrics_of_one_batch_equal_the_model_loss():
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=32, max_position_embeddings=32, pad_token_id=0))
    objective = MaskedLMWithNSP(ObjectiveConfig(name="mlm_nsp"), VOCAB, seed=0)
    batch = objective.collate(pair_samples(6), train=True)
    assert set(batch["next_sentence_label"].tolist()) == {0, 1}
    metrics, sums = check_loss_and_eval(objective, model, batch)
    assert metrics["loss"] == pytest.approx(metrics["mlm_loss"] + metrics["nsp_loss"])
    assert sums["nsp_pairs"].item() == 6 and 0 <= metrics["nsp_accuracy"] <= 1 and 0 <= metrics["mlm_accuracy"] <= 1
