"""Preparing fine-tuning data from the records users hold: column mapping, labels from the data, held-out
or given validation records with their references, and every bad-record case named by file and line (or
skipped and counted with data.lenient=true)."""

import json

import pytest

from common.errors import LmforgeError
from data.finetune import read_references
from data.prepared import open_split, read_meta, read_vocabulary
from orchestrator.cli import main
from orchestrator.config import load_config
from orchestrator.launcher import prepare_data

SMALL = ["model=bert-tiny", "data=records", "data.seq_len=32", "data.tokenizer.vocab_size=300"]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def prepare(tmp_path, overrides):
    return prepare_data(load_config(SMALL + overrides + [f"paths.root={tmp_path}"]))


def reviews(n: int):
    words = {"good": "great lovely fine superb", "bad": "awful poor broken dull"}
    return [{"review": f"this was {words[label].split()[i % 4]} really {i}", "stars": label}
            for i in range(n) for label in ("good", "bad")]


def test_columns_are_mapped_labels_come_from_the_data_and_val_records_keep_their_truth(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", reviews(20))
    val = write_jsonl(tmp_path / "val.jsonl", reviews(3))
    prepared = prepare(tmp_path, ["objective=seq_cls", f"data.paths=[{train}]", f"data.val_paths=[{val}]",
                                  "data.column_map.text=review", "data.column_map.label=stars"])
    meta = read_meta(prepared)
    assert meta["labels"] == ["bad", "good"] and read_vocabulary(prepared).labels == ("bad", "good")
    assert meta["splits"]["train"]["examples"] == 40 and meta["splits"]["val"]["examples"] == 6
    assert read_references(prepared) == [1, 0, 1, 0, 1, 0]  # gold label ids of val.jsonl, in order
    sample = open_split(prepared, "val")[0]
    assert sample["input_ids"][0] == read_vocabulary(prepared).cls_id and int(sample["example_id"][0]) == 0


def test_validation_records_are_held_out_by_record_when_no_val_paths_are_given(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", reviews(50))
    prepared = prepare(tmp_path, ["objective=seq_cls", f"data.paths=[{train}]", "data.val_fraction=0.2",
                                  "data.column_map.text=review", "data.column_map.label=stars"])
    splits = read_meta(prepared)["splits"]
    assert splits["train"]["examples"] + splits["val"]["examples"] == 100
    assert 8 <= splits["val"]["examples"] <= 35


def test_an_unknown_label_at_eval_time_names_the_file_and_line(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", reviews(10))
    val = write_jsonl(tmp_path / "val.jsonl", [{"review": "fine", "stars": "good"}, {"review": "meh", "stars": "okay"}])
    overrides = ["objective=seq_cls", f"data.paths=[{train}]", f"data.val_paths=[{val}]",
                 "data.column_map.text=review", "data.column_map.label=stars"]
    with pytest.raises(LmforgeError, match=rf"{val}:2: label 'okay' is not one of the training labels \(bad, good\)"):
        prepare(tmp_path, overrides)
    prepared = prepare(tmp_path, overrides + ["data.lenient=true"])
    assert read_meta(prepared)["counts"]["bad_records_val"] == 1 and read_references(prepared) == [1]


def test_an_answer_that_is_not_in_its_context_names_the_file_and_line(tmp_path):
    good = {"id": "q1", "question": "What colour is the sky?", "context": "The sky is blue today.",
            "answers": {"text": ["blue"], "answer_start": [11]}}
    bad = good | {"id": "q2", "answers": {"text": ["green"], "answer_start": [11]}}
    train = write_jsonl(tmp_path / "qa.jsonl", [good] * 6 + [bad])
    val = write_jsonl(tmp_path / "qa-val.jsonl", [good])
    overrides = ["objective=extractive_qa", f"data.paths=[{train}]", f"data.val_paths=[{val}]"]
    with pytest.raises(LmforgeError, match=rf"{train}:7: answer 'green' is not at character 11 of its context"):
        prepare(tmp_path, overrides)
    assert read_meta(prepare(tmp_path, overrides + ["data.lenient=true"]))["counts"]["bad_records_train"] == 1


def test_a_tag_sequence_longer_than_its_tokens_names_the_file_and_line(tmp_path):
    good = {"tokens": ["Ada", "wrote", "code"], "tags": ["B-PER", "O", "O"]}
    train = write_jsonl(tmp_path / "ner.jsonl", [good] * 5 + [{"tokens": ["Ada"], "tags": ["B-PER", "O"]}])
    val = write_jsonl(tmp_path / "ner-val.jsonl", [good])
    with pytest.raises(LmforgeError, match=rf"{train}:6: 2 tags for 1 tokens"):
        prepare(tmp_path, ["objective=token_cls", f"data.paths=[{train}]", f"data.val_paths=[{val}]"])


def test_an_empty_conversation_names_the_file_and_line(tmp_path):
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}]
    train = write_jsonl(tmp_path / "chat.jsonl", chat * 5 + [{"messages": []}])
    val = write_jsonl(tmp_path / "chat-val.jsonl", chat)
    overrides = ["model=gpt-tiny", "objective=dialogue", "data.tokenizer.kind=byte_bpe", f"data.paths=[{train}]",
                 f"data.val_paths=[{val}]"]
    with pytest.raises(LmforgeError, match=rf"{train}:6: messages is empty"):
        prepare(tmp_path, overrides)
    prepared = prepare(tmp_path, overrides + ["data.lenient=true"])
    assert read_meta(prepared)["counts"]["bad_records_train"] == 1


def test_a_missing_column_says_which_key_to_map(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", reviews(5))
    code = main(["data", "prepare", *SMALL, "objective=seq_cls", f"data.paths=[{train}]", f"paths.root={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and f"{train}:1: no field 'text'" in err and "data.column_map.text" in err


def test_data_prepare_builds_a_task_and_reuses_it(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", reviews(20))
    args = ["data", "prepare", *SMALL, "objective=seq_cls", f"data.paths=[{train}]", "data.column_map.text=review",
            "data.column_map.label=stars", f"paths.root={tmp_path}"]
    assert main(args) == 0 and "prepared records" in capsys.readouterr().out
    assert main(args) == 0 and capsys.readouterr().out.startswith("reused prepared")
