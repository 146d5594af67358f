"""The contract of a fine-tuning task: an objective that also turns labelled records into samples, predicts,
and scores its predictions with the metrics users know.

A task is an `Objective` (collate, loss, eval_sums, metrics: see model.objectives.base) plus:

    Driver, when the data is prepared (data.records reads the records, data.finetune writes the shards):
        builder = Cls.builder(cfg, tokenizer, seq_len, labels)
        builder.fields                      # field -> "ids" or a numpy dtype name, like SampleBuilder.fields
        builder.label_names(record)         # the label names a training record uses (labelled tasks)
        builder.texts(record)               # texts to train a tokenizer on, when none is given
        builder.samples(record, example_id) # a record's samples; raises BadRecord with the reason
        builder.reference(record)           # JSON-able truth the metrics compare with (validation records)

    Every rank, at each evaluation, over every validation sample exactly once:
        task.predict(model, batch, samples) # one small JSON-able prediction per sample, with "example_id"

    Rank 0, on all ranks' predictions gathered (ordered by sample id):
        task.score(predictions, references) # {"f1": ..., "accuracy": ...}; references[example_id]

    The `lmforge predict` command, on one input:
        task.infer(model, tokenizer, text, context=None) -> dict   # what the user wants to see
        task.show(result) -> str                                    # that, as a few lines of text

A record is a dict whose keys are the task's `roles` (after `data.column_map` renamed the user's columns).
Each sample carries an `example_id` field (int64, one value): the index of its record within its split, so
that tasks with several samples per record (QA's document stride) can put a record's predictions together.
"""

from collections.abc import Sequence

import numpy as np
import torch

from common.errors import BadRecord  # noqa: F401 - raised by every task's builder; defined where data/ sees it
from model.objectives.base import Objective


class TaskBuilder:
    """Turns records into samples for one task. `labels` is the label vocabulary (names, in id order) built
    from the training records' `label_names`; empty for tasks without labels, and while it is being built."""

    fields: dict[str, str] = {}

    def __init__(self, cfg, tokenizer, seq_len: int, labels: Sequence[str] = ()):
        self.cfg, self.tokenizer, self.seq_len = cfg, tokenizer, seq_len
        self.labels = list(labels)
        self.label_ids = {name: i for i, name in enumerate(self.labels)}

    def label_names(self, record: dict) -> list[str]:
        return []

    def texts(self, record: dict) -> list[str]:
        raise NotImplementedError

    def samples(self, record: dict, example_id: int) -> list[dict[str, np.ndarray]]:
        raise NotImplementedError

    def reference(self, record: dict):
        raise NotImplementedError

    def label_id(self, name) -> int:
        """The id of a label name, or BadRecord naming the known labels (an unknown label at eval time)."""
        name = str(name)
        if name not in self.label_ids:
            known = ", ".join(self.labels[:20]) + (" ..." if len(self.labels) > 20 else "")
            raise BadRecord(f"label '{name}' is not one of the training labels ({known})")
        return self.label_ids[name]


def example_field(example_id: int) -> np.ndarray:
    return np.asarray([example_id], dtype=np.int64)


class Task(Objective):
    roles: tuple[str, ...] = ()  # record keys the task reads; data.column_map maps the user's columns to them
    required_roles: tuple[str, ...] = ()  # those every record must have (others are optional, e.g. text_pair)
    labelled: bool = False  # labels are names found in the training data (the manifest keeps them in id order)
    tokenizer_roles: tuple[str, ...] = ()  # special tokens the tokenizer must hold: cls, sep, mask, eos
    builder_class: type[TaskBuilder] = TaskBuilder

    @classmethod
    def builder(cls, cfg, tokenizer, seq_len: int, labels: Sequence[str] = ()) -> TaskBuilder:
        return cls.builder_class(cfg, tokenizer, seq_len, labels)

    @staticmethod
    def prepare_tokenizer(cfg, tokenizer):
        """The tokenizer the task trains with, from the given or trained one: dialogue adds its role tokens
        and chat template here. Called once, before any sample is built; what it returns is saved."""
        return tokenizer

    @property
    def labels(self) -> tuple[str, ...]:
        return self.vocab.labels

    def predict(self, model, batch: dict[str, torch.Tensor], samples: Sequence[dict]) -> list[dict]:
        raise NotImplementedError

    def score(self, predictions: list[dict], references: list) -> dict[str, float]:
        raise NotImplementedError

    def infer(self, model, tokenizer, text: str, context: str | None = None) -> dict:
        raise NotImplementedError

    def show(self, result: dict) -> str:
        raise NotImplementedError

    def baseline(self, references: list) -> dict[str, float]:
        """The task's metrics for the trivial prediction its README line compares with (majority class,
        empty entities, ...), on these references: what a trained model must beat."""
        raise NotImplementedError
