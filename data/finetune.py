"""Build a fine-tuning task's prepared data: labelled records -> the task's samples in WebDataset shards.

The same layout as a pretraining corpus (tokenizer/, `<split>-NNNNNN.tar` shards with their index, and
manifest.json), so the loader, exact resume and checkpoints work unchanged. What differs:
- samples come from records (data.records reads them, file and line known for every one), one or more per
  record, built by the task's builder, which the caller passes in: data/ knows nothing of tasks or losses;
- the label vocabulary is built from the training records (sorted names) and kept in the manifest;
- validation records come from data.val_paths, or are held out from data.paths by a seeded hash of each
  record; the validation split keeps `val.references.jsonl`, the truth each record's metrics compare with.
Records are read twice (labels and tokenizer texts, then samples) rather than held in memory.
"""

import json
import time
from collections import Counter
from pathlib import Path

from common.errors import BadRecord, LmforgeError
from data.config import DataConfig
from data.packing import token_dtype
from data.pipeline import field_dtypes, vocabulary_fields
from data.records import iter_records, record_key
from data.shards import ShardWriter
from data.sources import LENIENT_HINT
from data.tokenizer import load_tokenizer, special_ids, train_tokenizer, with_special_tokens

REFERENCES = "{split}.references.jsonl"
HASH_BUCKETS = 1 << 16  # a record is held out when its hash falls in the first val_fraction of the buckets


def build_task_data(cfg: DataConfig, out: Path, seed: int, task, task_cfg, progress: bool = False,
                    labels: list[str] | None = None, evaluate_only: bool = False) -> dict:
    """Write the task's shards, tokenizer and references into `out`; return the manifest (not yet written).

    `task` is the task class (model.tasks.base.Task): its roles, tokenizer needs and builder. `labels`: a
    trained model's labels (lmforge eval), which the records must use, instead of a vocabulary built from
    them. `evaluate_only`: every record of data.paths goes to the validation split (there is no training).
    """
    started, stats = time.time(), Counter()

    def records(split: str, counted: bool = True):
        """(where, record) of one split, in a deterministic order. Skips and bad input are counted once, on
        the pass that writes samples (`counted`); the earlier passes (tokenizer, labels) read the same."""
        seen = stats if counted else Counter()
        if evaluate_only:
            yield from iter_records(cfg, cfg.paths, seen, task.roles, task.required_roles) if split == "val" else ()
            return
        if cfg.val_paths:
            paths = cfg.paths if split == "train" else cfg.val_paths
            yield from iter_records(cfg, paths, seen, task.roles, task.required_roles)
            return
        # Held-out records are read (and counted) on the training pass; the validation pass counts nothing.
        seen = seen if split == "train" else Counter()
        for where, record in iter_records(cfg, cfg.paths, seen, task.roles, task.required_roles):
            held_out = record_key(record, seed) % HASH_BUCKETS < cfg.val_fraction * HASH_BUCKETS
            if held_out == (split == "val"):
                yield where, record

    tokenizer = task_tokenizer(cfg, task, task_cfg, records("train", counted=False))
    tokenizer.save_pretrained(str(out / "tokenizer"))
    if labels is None:
        labels = label_vocabulary(task, task_cfg, tokenizer, cfg, records("train", counted=False)) if task.labelled else []
    builder = task.builder(task_cfg, tokenizer, cfg.seq_len, labels)
    dtypes = field_dtypes(builder.fields, token_dtype(len(tokenizer)))
    splits = {}
    for split in ("train", "val"):
        splits[split] = write_split(cfg, out, split, builder, dtypes, records(split), stats, progress, evaluate_only)
    if splits["val"]["examples"] == 0:
        raise LmforgeError("data: no records to evaluate in data.paths" if evaluate_only else
                           "data: no validation records; give data.val_paths or raise data.val_fraction")
    return vocabulary_fields(tokenizer, len(tokenizer), out) | {
        "task": task.name, "labels": labels, "fields": {n: d.name for n, d in dtypes.items()},
        "special": special_ids(tokenizer, 0), "splits": splits, "counts": dict(sorted(stats.items())),
        "engine": "local", "seconds": round(time.time() - started, 3)}


def task_tokenizer(cfg: DataConfig, task, task_cfg, train_records):
    """The published model's tokenizer (checked for the special tokens the task needs), or one trained on
    the training records' texts; then whatever the task adds (dialogue's role tokens and chat template)."""
    if cfg.tokenizer.kind == "pretrained":
        tokenizer = with_special_tokens(load_tokenizer(cfg.tokenizer.path), cfg.tokenizer.path,
                                        task.tokenizer_roles, 0)
    else:
        texts_of = task.builder(task_cfg, None, cfg.seq_len).texts

        def texts():
            for i, (_, record) in enumerate(train_records):
                if i >= cfg.tokenizer.train_docs:
                    return
                try:
                    yield from texts_of(record)
                except BadRecord:  # named (or counted) when its samples are built, where its line is known
                    continue

        tokenizer = train_tokenizer(texts(), cfg.tokenizer, task.tokenizer_roles)
    return task.prepare_tokenizer(task_cfg, tokenizer)


def label_vocabulary(task, task_cfg, tokenizer, cfg: DataConfig, train_records) -> list[str]:
    names_of = task.builder(task_cfg, tokenizer, cfg.seq_len).label_names
    names: set[str] = set()
    for _, record in train_records:
        names.update(str(n) for n in names_of(record))
    if len(names) < 2:
        raise LmforgeError(f"data: the training records hold {len(names)} label(s) ({', '.join(sorted(names))}); "
                           f"objective={task.name} needs at least 2 (check data.column_map.label)")
    return sorted(names)


def write_split(cfg: DataConfig, out: Path, split: str, builder, dtypes: dict, records, stats: Counter,
                progress: bool, evaluate_only: bool = False) -> dict:
    from tqdm import tqdm

    writer = ShardWriter(out, split, int(cfg.shard_mb * (1 << 20)), dtypes)
    references = open(out / REFERENCES.format(split=split), "w") if split == "val" else None  # noqa: SIM115
    examples = 0
    try:
        for where, record in tqdm(records, desc=f"{split} records", unit=" records", disable=not progress):
            try:
                samples = builder.samples(record, examples)
                reference = builder.reference(record) if references is not None else None
            except BadRecord as e:
                if not cfg.lenient:
                    raise LmforgeError(f"{where}: {e}; {LENIENT_HINT}") from None
                stats[f"bad_records_{split}"] += 1
                continue
            for sample in samples:
                writer.write(sample)
            if references is not None:
                references.write(json.dumps(reference) + "\n")
            examples += 1
    finally:
        if references is not None:
            references.close()
    shards = writer.close()
    if split == "train" and writer.samples == 0 and not evaluate_only:
        raise LmforgeError(f"data: no training samples were built from {', '.join(cfg.paths)}")
    return {"documents": examples, "examples": examples, "blocks": writer.samples, "tokens": writer.tokens,
            "shards": shards}


def read_references(prepared: str | Path, split: str = "val") -> list:
    """The truth of every record of `split`, indexed by example id."""
    path = Path(prepared) / REFERENCES.format(split=split)
    with open(path) as f:
        return [json.loads(line) for line in f]
