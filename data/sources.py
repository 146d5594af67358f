"""Read raw documents from every text source, with bad input named precisely or skipped and counted.

Every reader yields `(text, cont)` pieces. `cont=True` means the document goes on in the next piece: a
document longer than `data.max_doc_chars` (a 500 MB single-line file, say) is read in bounded pieces so
memory never holds it whole, and packing later joins the pieces without a separator between them.
"""

import codecs
import glob
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from common.errors import LmforgeError
from data.config import DataConfig

READ_CHUNK = 1 << 20  # bytes per read: the working set per open file, whatever the line lengths
LENIENT_HINT = "set data.lenient=true to skip or repair such input and count it in the manifest"

_replaced = Counter()  # bytes replaced by the lenient UTF-8 handler, per process


def _count_and_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    _replaced["bytes"] += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("lmforge.count_replace", _count_and_replace)


def is_remote(path: str) -> bool:
    return path.startswith("pipe:") or "://" in path


def expand_paths(patterns: Iterable[str], source: str) -> list[str]:
    """Local globs and directories become sorted file lists; URLs and pipe: commands get brace expansion."""
    from braceexpand import braceexpand

    files: list[str] = []
    for pattern in patterns:
        if is_remote(pattern):
            files.extend(braceexpand(pattern))
            continue
        pattern = os.path.expanduser(pattern)
        if source == "hf_disk":
            if not Path(pattern).is_dir():
                raise LmforgeError(f"data.paths: {pattern} is not a directory written by datasets.save_to_disk")
            files.append(pattern)
            continue
        matches = sorted(glob.glob(pattern, recursive=True))
        if Path(pattern).is_dir():
            matches = sorted(str(p) for p in Path(pattern).rglob("*") if p.is_file())
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise LmforgeError(f"data.paths: no file matches {pattern}")
        files.extend(matches)
    return files


def open_stream(path: str):
    """A binary stream for a local file, an fsspec URI (s3://, gs://...), a URL or a pipe: command."""
    if path.startswith(("pipe:", "http://", "https://")):
        from webdataset.gopen import gopen

        return gopen(path, "rb")
    if "://" in path and not path.startswith("file://"):
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path.removeprefix("file://"), "rb")


class Decoder:
    """Incremental UTF-8 decoding that reports the absolute byte offset of the first bad byte."""

    def __init__(self, name: str, lenient: bool, stats: Counter):
        errors = "lmforge.count_replace" if lenient else "strict"
        self.name, self.stats, self.offset = name, stats, 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)

    def decode(self, chunk: bytes, final: bool = False) -> str:
        pending = len(self._decoder.getstate()[0])
        before = _replaced["bytes"]
        try:
            text = self._decoder.decode(chunk, final)
        except UnicodeDecodeError as e:
            at = self.offset - pending + e.start
            raise LmforgeError(f"{self.name}: invalid UTF-8 at byte offset {at}; {LENIENT_HINT}") from None
        self.stats["utf8_bytes_replaced"] += _replaced["bytes"] - before
        self.offset += len(chunk)
        return text


def split_long(text: str, max_chars: int) -> Iterator[tuple[str, bool]]:
    """Cut an over-long text into pieces, preferring a whitespace boundary near each cut."""
    while len(text) > max_chars:
        cut = text.rfind(" ", max_chars - max_chars // 8, max_chars)
        cut = cut + 1 if cut > 0 else max_chars
        yield text[:cut], True
        text = text[cut:]
    yield text, False


def read_text(stream, name: str, cfg: DataConfig, stats: Counter) -> Iterator[tuple[str, bool]]:
    """Documents of a text stream (per file, paragraph or line) in bounded memory."""
    sep = {"file": None, "paragraph": "\n\n", "line": "\n"}[cfg.text_unit]
    decoder, buf, total = Decoder(name, cfg.lenient, stats), "", 0
    while True:
        chunk = stream.read(READ_CHUNK)
        total += len(chunk)
        buf += decoder.decode(chunk, final=not chunk)
        if sep is not None:
            *docs, buf = buf.split(sep)
            yield from ((doc, False) for doc in docs)
        # A document with no separator in sight: emit pieces now rather than grow the buffer.
        while len(buf) > cfg.max_doc_chars:
            piece, _ = next(split_long(buf, cfg.max_doc_chars))
            yield piece, True
            buf = buf[len(piece):]
        if not chunk:
            break
    if total == 0:
        empty_file(name, cfg, stats)
        return
    yield buf, False


def empty_file(name: str, cfg: DataConfig, stats: Counter) -> None:
    if not cfg.lenient:
        raise LmforgeError(f"{name}: file is empty; remove it from data.paths or {LENIENT_HINT}")
    stats["empty_files"] += 1


def record_text(record: dict, cfg: DataConfig, where: str, stats: Counter) -> str | None:
    """The text of one record, from `data.text_field` or the joined `data.columns`."""
    fields = cfg.columns or [cfg.text_field]
    missing = [f for f in fields if record.get(f) is None]
    if missing:
        if not cfg.lenient:
            present = ", ".join(record) or "(none)"
            raise LmforgeError(f"{where}: no field '{missing[0]}'; fields present: {present} "
                               f"(set data.text_field or data.columns)")
        stats["missing_field"] += 1
        return None
    return "\n\n".join(str(record[f]) for f in fields)


def read_jsonl(stream, name: str, cfg: DataConfig, stats: Counter) -> Iterator[tuple[str, bool]]:
    for where, record in iter_json_lines(stream, name, cfg, stats):
        text = record_text(record, cfg, where, stats)
        if text is not None:
            yield from split_long(text, cfg.max_doc_chars)


def iter_json_lines(stream, name: str, cfg: DataConfig, stats: Counter) -> Iterator[tuple[str, dict]]:
    """("file:line", object) for each JSON object line of a stream; blank lines and (lenient) malformed
    lines are counted and skipped, a malformed line otherwise raises naming its file and line."""
    decoder, lineno = Decoder(name, cfg.lenient, stats), 0
    for lineno, raw in enumerate(stream, 1):  # noqa: B007 - lineno is used after the loop
        line = decoder.decode(raw)
        if not line.strip():
            stats["blank_lines"] += 1
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        except ValueError as e:
            if not cfg.lenient:
                reason = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
                raise LmforgeError(f"{name}:{lineno}: malformed JSON line ({reason}); {LENIENT_HINT}") from None
            stats["malformed_json"] += 1
            continue
        yield f"{name}:{lineno}", record
    if lineno == 0:
        empty_file(name, cfg, stats)


def read_table(path: str, cfg: DataConfig, stats: Counter) -> Iterator[tuple[str, bool]]:
    yield from read_records(iter_table_rows(path, cfg, stats), cfg, stats)


def read_hf_disk(path: str, cfg: DataConfig, stats: Counter) -> Iterator[tuple[str, bool]]:
    yield from read_records(iter_hf_disk_rows(path, cfg, stats), cfg, stats)


def read_records(rows: Iterable[tuple[str, dict]], cfg: DataConfig, stats: Counter) -> Iterator[tuple[str, bool]]:
    for where, record in rows:
        text = record_text(record, cfg, where, stats)
        if text is not None:
            yield from split_long(text, cfg.max_doc_chars)


def iter_table_rows(path: str, cfg: DataConfig, stats: Counter) -> Iterator[tuple[str, dict]]:
    """("file row N", row) of a CSV or Parquet file (cfg.source) through HF datasets, streamed so a large
    file never sits in memory."""
    import datasets

    if not is_remote(path) and os.path.getsize(path) == 0:
        empty_file(path, cfg, stats)
        return
    try:
        ds = datasets.load_dataset(cfg.source, data_files=[path], split="train", streaming=True)
        for row, record in enumerate(ds, 1):
            yield f"{path} row {row}", record
    except Exception as e:  # pyarrow and pandas raise many types for one cause: the file is not valid
        raise LmforgeError(f"{path}: cannot read as {cfg.source}: {str(e).splitlines()[0]}") from None


def iter_hf_disk_rows(path: str, cfg: DataConfig, stats: Counter) -> Iterator[tuple[str, dict]]:
    """("dir row N", row) of a directory written by datasets' save_to_disk."""
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:
        raise LmforgeError(f"{path}: not a dataset saved with save_to_disk: {str(e).splitlines()[0]}") from None
    if isinstance(ds, datasets.DatasetDict):
        # lmforge makes its own validation split, so a saved train split is the corpus.
        ds = ds["train"] if "train" in ds else datasets.concatenate_datasets(list(ds.values()))
    for row, record in enumerate(ds, 1):
        yield f"{path} row {row}", record


def read_webdataset(url: str, cfg: DataConfig, stats: Counter) -> Iterator[tuple[str, bool]]:
    """Samples of one tar shard: members sharing a key before the first dot form one sample."""
    fields = cfg.columns or [cfg.text_field]
    key, sample = None, {}
    try:
        with open_stream(url) as raw, tarfile.open(fileobj=(stream := CountingReader(raw)), mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                mkey, _, ext = base.partition(".")
                mkey = os.path.join(os.path.dirname(member.name), mkey)
                if mkey != key and sample:
                    yield from shard_sample(sample, f"{url} sample {key}", cfg, stats)
                    sample = {}
                key = mkey
                if ext in fields:
                    sample[ext] = tar.extractfile(member).read()
                    if len(sample[ext]) != member.size:
                        raise tarfile.ReadError(f"member {member.name} is cut short")
                else:
                    sample.setdefault("__other__", []).append(ext)
            # tarfile treats a missing end-of-archive block as a clean end; a cut-off shard must not pass.
            if key is not None and stream.count < tar.offset + tarfile.BLOCKSIZE:
                raise tarfile.ReadError("the archive ends without its end-of-archive marker")
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        if not cfg.lenient:
            raise LmforgeError(f"webdataset shard {url} is truncated or corrupt ({e}); {LENIENT_HINT}") from None
        stats["corrupt_shards"] += 1
        return
    if key is None:
        empty_file(url, cfg, stats)
    if sample:
        yield from shard_sample(sample, f"{url} sample {key}", cfg, stats)


class CountingReader:
    """Counts the bytes tarfile pulls from a stream, to tell a finished archive from a cut-off one."""

    def __init__(self, raw):
        self.raw, self.count = raw, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.count += len(data)
        return data


def shard_sample(sample: dict, where: str, cfg: DataConfig, stats: Counter) -> Iterator[tuple[str, bool]]:
    decoded = {}
    for ext, raw in sample.items():
        if ext != "__other__":
            decoded[ext] = Decoder(where, cfg.lenient, stats).decode(raw, final=True)
    if len(decoded) < len(cfg.columns or [cfg.text_field]):
        decoded.update(dict.fromkeys(sample.get("__other__", [])))  # so the error lists what exists
    text = record_text(decoded, cfg, where, stats)
    if text is not None:
        yield from split_long(text, cfg.max_doc_chars)


def iter_documents(cfg: DataConfig, stats: Counter) -> Iterator[tuple[str, bool]]:
    """Every document piece of the configured source, in a deterministic order."""
    if cfg.source == "embedded":
        from data.corpus import embedded_documents

        for doc in embedded_documents():
            yield from split_long(doc, cfg.max_doc_chars)
        return
    for path in expand_paths(cfg.paths, cfg.source):
        stats["files"] += 1
        if cfg.source in ("csv", "parquet"):
            yield from read_table(path, cfg, stats)
        elif cfg.source == "hf_disk":
            yield from read_hf_disk(path, cfg, stats)
        elif cfg.source == "webdataset":
            yield from read_webdataset(path, cfg, stats)
        else:
            reader = read_jsonl if cfg.source == "jsonl" else read_text
            with open_stream(path) as stream:
                yield from reader(stream, path, cfg, stats)
