"""Read labelled records for fine-tuning from the formats users hold, with bad input named precisely or skipped
and counted (data.lenient), as data.sources does for pre-training documents.

Every reader yields `(where, record)`: `where` names the file and line or row ("train.jsonl:17", "train.csv
row 4", "dev.json data[0].paragraphs[3].qas[1] (id 5733be28)") so that a task's BadRecord can be reported
where the user can find it. A record holds the task's roles: data.column_map renames the user's columns for
the column formats (jsonl, csv, parquet, hf_disk); conll and squad have fixed layouts and their own names.
"""

import hashlib
import json
from collections import Counter
from collections.abc import Iterator

from common.errors import LmforgeError
from data.config import RECORD_SOURCES, DataConfig
from data.sources import (
    LENIENT_HINT,
    Decoder,
    empty_file,
    expand_paths,
    iter_hf_disk_rows,
    iter_json_lines,
    iter_table_rows,
    open_stream,
)

# What the fixed-layout sources give: a task needing anything else cannot read them.
CONLL_ROLES = ("tokens", "tags")
SQUAD_ROLES = ("id", "question", "context", "answers")


def iter_records(cfg: DataConfig, paths: list[str], stats: Counter, roles: tuple[str, ...],
                 required: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    """(where, record) for every record of `paths` read as cfg.source, in a deterministic order.

    A record is {role: value} for each role in `roles` the source holds (a null value counts as absent). A
    record without a `required` role raises LmforgeError naming where it is and the column to map, or with
    data.lenient is skipped and counted in stats["missing_field"]. For source=builtin, `paths` are names of
    built-in data sets (see data.builtin)."""
    if cfg.source not in RECORD_SOURCES:
        raise LmforgeError(f"data.source={cfg.source} holds documents, not labelled records; use one of "
                           f"{', '.join(RECORD_SOURCES)}")
    if cfg.source == "builtin":
        from data.builtin import builtin_records

        for name in paths:
            yield from builtin_records(name, stats)
        return
    fixed = {"conll": CONLL_ROLES, "squad": SQUAD_ROLES}.get(cfg.source)
    if fixed is not None and (lacking := [r for r in required if r not in fixed]):
        raise LmforgeError(f"data.source={cfg.source} gives records with {', '.join(fixed)}, but this task "
                           f"needs {', '.join(lacking)}; give the data as jsonl, csv, parquet or hf_disk")
    for path in expand_paths(paths, cfg.source):
        stats["files"] += 1
        if cfg.source == "conll":
            with open_stream(path) as stream:
                rows = read_conll(stream, path, cfg, stats)
                yield from ((where, pick(record, roles)) for where, record in rows)
        elif cfg.source == "squad":
            yield from ((where, pick(record, roles)) for where, record in read_squad(path, cfg, stats))
        elif cfg.source == "jsonl":
            with open_stream(path) as stream:
                yield from map_columns(iter_json_lines(stream, path, cfg, stats), cfg, stats, roles, required)
        elif cfg.source in ("csv", "parquet"):
            yield from map_columns(iter_table_rows(path, cfg, stats), cfg, stats, roles, required)
        else:
            yield from map_columns(iter_hf_disk_rows(path, cfg, stats), cfg, stats, roles, required)


def record_key(record: dict, seed: int) -> int:
    """A stable 64-bit hash of a record's content salted by `seed`: the same record lands in the same split
    on every machine and every run, whatever order the files are read in."""
    content = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode()
    salt = seed.to_bytes(8, "little", signed=True)
    return int.from_bytes(hashlib.blake2b(content, digest_size=8, key=salt).digest(), "little")


def pick(record: dict, roles: tuple[str, ...]) -> dict:
    return {role: value for role, value in record.items() if role in roles}


def map_columns(rows, cfg: DataConfig, stats: Counter, roles: tuple[str, ...],
                required: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    """The task's roles of each user row, read from the columns data.column_map names."""
    for where, row in rows:
        record, problem = {}, None
        for role in roles:
            column = cfg.column_map.column(role)
            if row.get(column) is not None:
                record[role] = row[column]
            elif role in required and problem is None:
                present = ", ".join(row) or "(none)"
                problem = (f"{where}: field '{column}' (for {role}) is null" if column in row else
                           f"{where}: no field '{column}' (for {role}); fields present: {present}")
                problem += f" (set data.column_map.{role})"
        if problem is None:
            yield where, record
        elif cfg.lenient:
            stats["missing_field"] += 1
        else:
            raise LmforgeError(problem)


def read_conll(stream, name: str, cfg: DataConfig, stats: Counter) -> Iterator[tuple[str, dict]]:
    """Sentences of a token-per-line file: whitespace-separated columns, the token first and its tag last, a
    blank line between sentences, -DOCSTART- lines ignored."""
    decoder, lineno = Decoder(name, cfg.lenient, stats), 0
    tokens, tags, start, bad = [], [], 0, False

    def sentence():
        if tokens and not bad:
            yield f"{name}:{start}", {"tokens": list(tokens), "tags": list(tags)}

    for lineno, raw in enumerate(stream, 1):  # noqa: B007 - lineno is used after the loop
        columns = decoder.decode(raw).split()
        if not columns or columns[0] == "-DOCSTART-":
            yield from sentence()
            tokens, tags, bad = [], [], False
            continue
        if not tokens and not bad:
            start = lineno
        if len(columns) < 2:
            if not cfg.lenient:
                raise LmforgeError(f"{name}:{lineno}: expected a token and a tag, got '{columns[0]}'; "
                                   f"{LENIENT_HINT}")
            # A sentence with a tag missing cannot be aligned: drop all of it rather than guess.
            stats["bad_conll_lines"] += 1
            bad = True
            continue
        tokens.append(columns[0])
        tags.append(columns[-1])
    yield from sentence()
    if lineno == 0:
        empty_file(name, cfg, stats)


class SquadError(Exception):
    """A part of a SQuAD file that is not in SQuAD's layout: where (a JSON path) and what is wrong."""

    def __init__(self, at: str, problem: str):
        super().__init__(f"{at}: {problem}" if at else problem)
        self.at, self.problem = at, problem


def read_squad(path: str, cfg: DataConfig, stats: Counter) -> Iterator[tuple[str, dict]]:
    """One record per question of a SQuAD v1.1 or v2.0 JSON file, in HF datasets' squad layout. With
    data.lenient, a malformed question, paragraph or article is skipped and counted in
    stats["malformed_squad"]; otherwise it raises naming the file and the JSON path."""
    with open_stream(path) as stream:
        raw = stream.read()
    if not raw:
        empty_file(path, cfg, stats)
        return
    try:
        doc = json.loads(Decoder(path, cfg.lenient, stats).decode(raw, final=True))
    except json.JSONDecodeError as e:
        if not cfg.lenient:
            raise LmforgeError(f"{path}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                               f"{LENIENT_HINT}") from None
        stats["malformed_json"] += 1
        return

    def attempt(read, *args):
        """What `read` gives, or None when that part is not in SQuAD's layout: an error naming the file and
        JSON path, or with data.lenient the smallest broken part (question, paragraph, article) skipped."""
        try:
            return read(*args)
        except SquadError as e:
            if not cfg.lenient:
                raise LmforgeError(f"{path}{' ' if e.at else ': '}{e}; {LENIENT_HINT}") from None
            stats["malformed_squad"] += 1
            return None

    for at_article, article in attempt(squad_list, doc, "data", "") or ():
        for at_para, para in attempt(squad_list, article, "paragraphs", at_article) or ():
            context, questions = attempt(squad_paragraph, para, at_para) or (None, ())
            for at_qa, qa in questions:
                if (record := attempt(squad_record, qa, context, at_qa)) is not None:
                    yield f"{path} {at_qa} (id {record['id']})", record


def squad_paragraph(para, at: str) -> tuple[str, list]:
    return squad_field(para, "context", str, at), squad_list(para, "qas", at)


def squad_record(qa, context: str, at: str) -> dict:
    qid = str(squad_field(qa, "id", (str, int), at))
    try:
        question = squad_field(qa, "question", str, at)
        texts, starts = [], []
        # SQuAD v2 marks unanswerable questions; their "plausible_answers" are not answers.
        if not qa.get("is_impossible", False):
            for at_answer, answer in squad_list(qa, "answers", at):
                texts.append(squad_field(answer, "text", str, at_answer))
                starts.append(squad_field(answer, "answer_start", int, at_answer))
    except SquadError as e:
        raise SquadError(f"{e.at} (id {qid})", e.problem) from None  # the id is what a user can search for
    return {"id": qid, "question": question, "context": context,
            "answers": {"text": texts, "answer_start": starts}}


def squad_list(obj, key: str, at: str) -> list[tuple[str, object]]:
    """(JSON path, item) of each item of the list obj[key]."""
    prefix = f"{at}.{key}" if at else key
    return [(f"{prefix}[{i}]", item) for i, item in enumerate(squad_field(obj, key, list, at))]


KIND_NAMES = {list: "a list", str: "a string", int: "an integer", (str, int): "a string or an integer"}


def squad_field(obj, key: str, kind, at: str):
    if not isinstance(obj, dict):
        raise SquadError(at, f"expected an object with '{key}', got {json_type(obj)}")
    if key not in obj:
        raise SquadError(at, f"no field '{key}'; fields present: {', '.join(obj) or '(none)'}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):  # JSON true is not an offset or an id
        raise SquadError(at, f"'{key}' should be {KIND_NAMES[kind]}, got {json_type(value)}")
    return value


def json_type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
