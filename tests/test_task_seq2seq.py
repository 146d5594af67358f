"""Seq2seq task: T5 samples that end in eos, bad records, padding, BLEU and ROUGE equal to sacrebleu and
rouge_score, the copy-the-source baseline, and a tiny T5 that learns to reverse word lists."""

import numpy as np
import pytest
import sacrebleu
import torch
from model_helpers import check_loss_and_eval
from rouge_score import rouge_scorer
from task_helpers import eval_metric

from common.errors import BadRecord
from data.config import TokenizerConfig
from data.prepared import Vocabulary
from data.tokenizer import train_tokenizer
from model.build import build_model
from model.config import ModelConfig
from model.objectives.base import IGNORE_INDEX
from model.objectives.config import ObjectiveConfig
from model.tasks.seq2seq import Seq2Seq

WORDS = ["red", "green", "blue", "cat", "dog", "bird", "one", "two", "three", "sun", "moon", "star"]


def reversal_records(n: int, seed: int = 0) -> list[dict]:
    """Lists of 2-5 words, whose target is the same words in reverse order."""
    rng = np.random.default_rng(seed)
    sources = [" ".join(rng.choice(WORDS, size=rng.integers(2, 6))) for _ in range(n)]
    return [{"source": s, "target": " ".join(s.split()[::-1])} for s in sources]


RECORDS = reversal_records(64)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [r["source"] for r in RECORDS] * 5 + ["reverse: the words"] * 5
    return train_tokenizer(texts, TokenizerConfig(kind="byte_bpe", vocab_size=300, min_frequency=1), roles=("eos",))


def task_for(tokenizer, world_size=1, **cfg):
    cfg = ObjectiveConfig(name="seq2seq", **cfg)
    vocab = Vocabulary(size=len(tokenizer), bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
                       pad_id=tokenizer.pad_token_id)
    return Seq2Seq(cfg, vocab, seed=0, tokenizer=tokenizer, world_size=world_size), cfg


def samples_of(tokenizer, cfg, records, seq_len=32):
    builder = Seq2Seq.builder(cfg, tokenizer, seq_len)
    return [{**s, "sample_id": i, "epoch": 0} for i, r in enumerate(records) for s in builder.samples(r, i)]


def tiny_t5(tokenizer):
    return build_model(ModelConfig(arch="t5", n_layer=1, n_head=2, n_embd=32, max_seq_len=64), len(tokenizer), 0,
                       head="seq2seq_lm", eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)


def test_samples_are_the_prefixed_source_and_the_target_each_ending_in_eos(tokenizer):
    _, cfg = task_for(tokenizer, source_prefix="reverse: ")
    builder = Seq2Seq.builder(cfg, tokenizer, 32)
    assert builder.fields == {"input_ids": "ids", "labels": "ids", "example_id": "int64"}
    sample, = builder.samples({"source": "red cat", "target": "cat red"}, 7)
    eos = tokenizer.eos_token_id
    assert sample["input_ids"].tolist() == tokenizer("reverse: red cat", add_special_tokens=False)["input_ids"] + [eos]
    assert sample["labels"].tolist() == tokenizer("cat red", add_special_tokens=False)["input_ids"] + [eos]
    assert tokenizer.decode(sample["input_ids"]) == "reverse: red cat" + tokenizer.eos_token
    assert sample["example_id"].tolist() == [7] and sample["example_id"].dtype == np.int64


def test_long_source_and_target_are_cut_to_their_limits_and_still_end_in_eos(tokenizer):
    _, cfg = task_for(tokenizer, max_target_len=5)
    long_text = " ".join(WORDS * 3)
    sample, = Seq2Seq.builder(cfg, tokenizer, 10).samples({"source": long_text, "target": long_text}, 0)
    ids = tokenizer(long_text, add_special_tokens=False)["input_ids"]
    assert sample["input_ids"].tolist() == ids[:9] + [tokenizer.eos_token_id]
    assert sample["labels"].tolist() == ids[:4] + [tokenizer.eos_token_id]


@pytest.mark.parametrize("record, problem", [({"source": "", "target": "cat"}, "source is empty"),
                                             ({"source": "cat", "target": "  "}, "target is empty"),
                                             ({"source": "cat", "target": None}, "target is empty")])
def test_an_empty_source_or_target_is_a_bad_record(tokenizer, record, problem):
    _, cfg = task_for(tokenizer)
    builder = Seq2Seq.builder(cfg, tokenizer, 32)
    with pytest.raises(BadRecord, match=problem):
        builder.samples(record, 0)
    with pytest.raises(BadRecord, match=problem):
        builder.reference(record)


def test_reference_holds_target_and_source_and_texts_need_no_tokenizer(tokenizer):
    _, cfg = task_for(tokenizer)
    record = {"source": "red cat", "target": "cat red"}
    assert Seq2Seq.builder(cfg, tokenizer, 32).reference(record) == {"target": "cat red", "source": "red cat"}
    assert Seq2Seq.builder(cfg, None, 32).texts(record) == ["red cat", "cat red"]


def test_collate_pads_sources_with_pad_and_targets_with_ignore_and_the_loss_is_the_models(tokenizer):
    task, cfg = task_for(tokenizer)
    samples = samples_of(tokenizer, cfg, [{"source": "red", "target": "one two three"},
                                          {"source": "red green blue cat", "target": "sun"}])
    batch = task.collate(samples, train=True)
    long_source, short_target = samples[1]["input_ids"], samples[1]["labels"]
    assert batch["input_ids"].shape == (2, len(long_source))
    assert batch["input_ids"][0, len(samples[0]["input_ids"]):].eq(tokenizer.pad_token_id).all()
    assert batch["attention_mask"].sum(1).tolist() == [len(s["input_ids"]) for s in samples]
    assert batch["labels"][1, len(short_target):].eq(IGNORE_INDEX).all()
    assert batch["labels"][1, :len(short_target)].tolist() == short_target.tolist()
    assert task.tokens(batch) == (sum(len(s["input_ids"]) for s in samples), sum(len(s["labels"]) for s in samples))
    metrics, sums = check_loss_and_eval(task, tiny_t5(tokenizer), batch)
    assert set(metrics) == {"loss", "perplexity"} and sums["tokens"].item() == task.tokens(batch)[1]
    assert metrics["perplexity"] == pytest.approx(np.exp(metrics["loss"]))


PREDICTIONS = ["the cat sat on the mat", "a quick brown fox jumped", "", "running dogs run quickly home"]
TARGETS = ["the cat is sitting on the mat", "the quick brown fox jumps over", "nothing here", "the dog runs home"]


def test_bleu_and_rouge_equal_sacrebleu_and_rouge_score_on_fixed_strings(tokenizer):
    task, _ = task_for(tokenizer)
    references = [{"target": t, "source": "unused"} for t in TARGETS]
    # Predictions arrive ordered by sample id, not example id: scoring must follow example_id.
    predictions = [{"example_id": i, "text": PREDICTIONS[i]} for i in (2, 0, 3, 1)]
    scores = task.score(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rouge = [scorer.score(t, p) for p, t in zip(PREDICTIONS, TARGETS)]
    expected = {"bleu": sacrebleu.corpus_bleu(PREDICTIONS, [TARGETS]).score,
                "rouge1": 100 * np.mean([r["rouge1"].fmeasure for r in rouge]),
                "rouge2": 100 * np.mean([r["rouge2"].fmeasure for r in rouge]),
                "rouge_l": 100 * np.mean([r["rougeL"].fmeasure for r in rouge])}
    assert scores == pytest.approx(expected, abs=1e-9)
    assert 0 < expected["bleu"] < 100 and 0 < expected["rouge_l"] < 100
    # The strings tell stemming apart ("dogs", "runs" and "running" match "dog" and "run" only stemmed).
    unstemmed = rouge_scorer.RougeScorer(["rouge1"]).score(TARGETS[3], PREDICTIONS[3])["rouge1"].fmeasure
    assert rouge[3]["rouge1"].fmeasure > unstemmed
    assert task.score([{"example_id": 0, "text": TARGETS[0]}], references) == pytest.approx(
        {"bleu": 100.0, "rouge1": 100.0, "rouge2": 100.0, "rouge_l": 100.0})


def test_baseline_is_the_score_of_copying_the_source(tokenizer):
    task, _ = task_for(tokenizer)
    references = [{"target": t, "source": p} for p, t in zip(PREDICTIONS, TARGETS)]
    predictions = [{"example_id": i, "text": p} for i, p in enumerate(PREDICTIONS)]
    assert task.baseline(references) == task.score(predictions, references)


class FakeEngine:
    """What predict sees under DeepSpeed: the HF model as .module; records the generate arguments."""

    def __init__(self, ids):
        self.module, self.ids, self.calls = self, ids, []

    def generate(self, **kwargs):
        self.calls.append(kwargs)
        return torch.tensor([self.ids] * len(kwargs["input_ids"]))


@pytest.mark.parametrize("world_size", [1, 2])
def test_predict_unwraps_an_engine_and_keeps_ranks_in_step_when_several_generate(tokenizer, world_size):
    task, cfg = task_for(tokenizer, world_size=world_size, num_beams=3, max_new_tokens=7)
    samples = samples_of(tokenizer, cfg, RECORDS[:2])
    output = [tokenizer.pad_token_id, *tokenizer("sun moon", add_special_tokens=False)["input_ids"],
              tokenizer.eos_token_id]
    engine = FakeEngine(output)
    predictions = task.predict(engine, task.collate(samples, train=False), samples)
    assert predictions == [{"example_id": 0, "text": "sun moon"}, {"example_id": 1, "text": "sun moon"}]
    call, = engine.calls
    assert (call["num_beams"], call["max_new_tokens"], call["synced_gpus"]) == (3, 7, world_size > 1)


def test_a_tiny_t5_learns_to_reverse_word_lists_and_beats_copying(tokenizer, one_thread):
    """300 steps of AdamW on 1000 lists: the held-out loss falls below a quarter of the untrained model's, and
    ROUGE-L and BLEU beat copying the source by 20 points."""
    task, cfg = task_for(tokenizer, max_target_len=16, max_new_tokens=12)
    # Enough distinct lists that the model must learn to reverse rather than memorise the answers.
    train, val = samples_of(tokenizer, cfg, reversal_records(1000)), samples_of(tokenizer, cfg, reversal_records(16, seed=1))
    references = [Seq2Seq.builder(cfg, tokenizer, 32).reference(r) for r in reversal_records(16, seed=1)]
    model = tiny_t5(tokenizer)
    val_batch = task.collate(val, train=False)

    def val_loss():
        return eval_metric(task, model, val_batch, "loss")

    untrained = val_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    for _ in range(300):
        loss = task.loss(model, task.collate([train[i] for i in rng.choice(len(train), 32, replace=False)]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = val_loss()
    assert trained < untrained / 4, (untrained, trained)

    model.eval()
    predictions = task.predict(model, val_batch, val)
    assert [p["example_id"] for p in predictions] == list(range(16))
    assert all(isinstance(p["text"], str) for p in predictions)
    scores, copying = task.score(predictions, references), task.baseline(references)
    # Copying gets every word right but in the wrong order; the model must get the order too.
    assert scores["rouge_l"] > copying["rouge_l"] + 20 and scores["bleu"] > copying["bleu"] + 20, (scores, copying)

    result = task.infer(model, tokenizer, RECORDS[0]["source"])
    assert set(result) == {"output"} and task.show(result) == result["output"]
    assert result["output"] == task.predict(model, task.collate(train[:1], train=False), train[:1])[0]["text"]
