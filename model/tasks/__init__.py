"""Fine-tuning tasks, chosen like objectives by `objective.name`; one module each (model/tasks/base.py says
what a task module holds). Imported when first named, so a pretraining run never loads their metric code."""

import importlib

TASKS = {
    "seq_cls": ("model.tasks.classification", "SequenceClassification"),
    "token_cls": ("model.tasks.token_cls", "TokenClassification"),
    "extractive_qa": ("model.tasks.extractive_qa", "ExtractiveQA"),
    "seq2seq": ("model.tasks.seq2seq", "Seq2Seq"),
    "dialogue": ("model.tasks.dialogue", "Dialogue"),
}


def get_task(name: str):
    module, cls = TASKS[name]
    return getattr(importlib.import_module(module), cls)


def is_task(objective_class) -> bool:
    from model.tasks.base import Task

    return issubclass(objective_class, Task)
