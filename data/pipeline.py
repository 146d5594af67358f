"""Build a prepared corpus: read and clean, split, train a tokenizer, tokenize (Ray Data or local), pack, shard.

Stages, each bounded in driver memory:
1. read + clean on the driver, in source order (first of a duplicate wins), into ~1 MB chunks; with the
   Ray engine each chunk goes straight to the object store as an Arrow table.
2. split whole documents into train/val by a seeded hash rank, and train the tokenizer on train documents.
3. tokenize the chunks with Ray Data `map_batches` across the cluster, or in a thread of this process
   (which starts on each chunk as it is read when the tokenizer is given); results stream back in order,
   so packing and writing overlap tokenization.
4. pack each split and write WebDataset shards; the manifest records counts, drops, checksums and config.
"""

import hashlib
import os
import shutil
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from common.errors import LmforgeError
from common.raynet import use_loopback_only
from data.clean import Cleaner
from data.config import DataConfig
from data.encode import encodings, to_ids, tokenize_table
from data.packing import StreamPacker, token_dtype
from data.samples import CAUSAL_BLOCKS, BlockBuilder, SampleSpec
from data.shards import ShardWriter
from data.sources import iter_documents
from data.tokenizer import load_tokenizer, special_ids, train_tokenizer, with_special_tokens

CHUNK_CHARS = 1_000_000  # text per chunk: one Ray Data block, one tokenize task; small keeps the pipeline full
# BPE training cost grows with the longest whitespace-free run (minified code, base64): sample heads only.
TRAIN_CHARS = 20_000
LOCAL_AHEAD = 8  # chunks the local engine tokenizes ahead of packing (about 1 MB of text each)
SPLITS = ("train", "val")


def build(cfg: DataConfig, out: Path, seed: int, engine: str, progress: bool,
          worker_env: dict[str, str] | None = None, spec: SampleSpec = CAUSAL_BLOCKS) -> dict:
    """Write shards and tokenizer into `out`; return the manifest (not yet written).

    `worker_env`: environment for the Ray Data job's workers, when this call starts Ray (see start_ray).
    `spec`: how documents become samples, as the objective asks."""
    started, stats = time.time(), Counter()
    if cfg.source == "tokens":
        if spec != CAUSAL_BLOCKS:
            raise LmforgeError(f"data.source=tokens holds bare token ids without documents or special tokens; "
                               f"this objective needs {spec.kind} samples built from text")
        return build_from_tokens(cfg, out, seed, stats) | {"seconds": round(time.time() - started, 3)}
    started_ray, early = engine == "ray" and start_ray(worker_env), None
    roles = tuple(dict.fromkeys(((spec.separator,) if spec.kind == "blocks" else ()) + spec.special_tokens))
    try:
        # A given tokenizer can start on each chunk as it is read; a trained one needs the whole split first.
        path = cfg.tokenizer.path
        given = (with_special_tokens(load_tokenizer(path), path, roles, spec.sentinels)
                 if cfg.tokenizer.kind == "pretrained" else None)
        early = ThreadTokenizer(given.backend_tokenizer.to_str()) if given and engine == "local" else None
        chunks, keys = stage_documents(cfg, seed, stats, engine, progress, early.submit if early else None,
                                       sentences=spec.segments == "sentences")
        if len(keys) < 2:
            raise LmforgeError(f"data: only {len(keys)} document(s) left after cleaning "
                               f"({dict(stats)}); need at least 2 for a train/val split")
        n_val = max(1, round(len(keys) * cfg.val_fraction))
        val_below = np.partition(keys, n_val - 1)[n_val - 1]  # keys <= this are validation documents
        tokenizer = given or train_tokenizer(train_texts(chunks, val_below, cfg.tokenizer.train_docs),
                                             cfg.tokenizer, roles, spec.sentinels)
        tokenizer.save_pretrained(str(out / "tokenizer"))
        tokenized = early or tokenize(chunks, tokenizer.backend_tokenizer.to_str(), engine)
        splits, fields = pack_and_write(cfg, out, tokenized, val_below, tokenizer, stats, progress, len(chunks), spec,
                                seed)
    finally:
        if early is not None:  # bad input stops reading: do not finish tokenizing what was read
            early.close()
        if started_ray:
            import ray

            ray.shutdown()
    samples = {"samples": asdict(spec), "fields": fields} if spec != CAUSAL_BLOCKS else {}
    return vocabulary_fields(tokenizer, len(tokenizer), out) | samples | {
        "special": special_ids(tokenizer, spec.sentinels), "splits": splits,
        "counts": dict(sorted(stats.items())), "engine": engine, "seconds": round(time.time() - started, 3)}


def vocabulary_fields(tokenizer, vocab_size: int, out: Path) -> dict:
    """The manifest's vocabulary: size and special ids, None where there is no such token (or no tokenizer).

    pad_id stays None for a tokenizer without a pad token: padding is tracked by length, never by an id
    that may also be text (GPT-2 has no pad token, and its EOS separates documents)."""
    if tokenizer is None:
        return {"vocab_size": vocab_size, "bos_id": None, "eos_id": None, "pad_id": None, "tokenizer_sha256": None}
    tok_hash = hashlib.sha256((out / "tokenizer" / "tokenizer.json").read_bytes()).hexdigest()
    return {"vocab_size": vocab_size, "bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id,
            "pad_id": tokenizer.pad_token_id, "tokenizer_sha256": tok_hash}


# Variables a Ray Data job needs to behave like this process; secrets among them stay behind (see forwarded_env).
FORWARDED_PREFIXES = ("RAY_", "TOKENIZERS_", "HF_")
FORWARD_ENV = "LMFORGE_FORWARD_ENV"  # comma-separated names the user chooses to send to the cluster anyway
SECRET_WORDS = {"TOKEN", "SECRET", "SECRETS", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS", "AUTH",
                "APIKEY", "KEY", "COOKIE"}


def is_secret_name(name: str) -> bool:
    """True for a variable whose name says it holds a credential: HF_TOKEN, RAY_AUTH_TOKEN, *_PASSWORD.

    By whole words between underscores, so TOKENIZERS_PARALLELISM is not one."""
    return bool(SECRET_WORDS.intersection(name.upper().split("_")))


def forwarded_env(environ: dict[str, str], extra: dict[str, str] | None = None) -> dict[str, str]:
    """The job's env_vars: `extra` (lmforge's quiet/offline settings) and the Ray, tokenizers and HF
    variables of `environ`, but never a secret unless its name is listed in LMFORGE_FORWARD_ENV.

    A runtime env is stored by the cluster and shown in its dashboard and job records, so an HF_TOKEN or
    RAY_AUTH_TOKEN put there would leak to everyone who can read them."""
    named = {n.strip() for n in environ.get(FORWARD_ENV, "").split(",") if n.strip()}
    env = {k: v for k, v in (extra or {}).items() if not is_secret_name(k) or k in named}
    env |= {k: v for k, v in environ.items()
            if k in named or (k.startswith(FORWARDED_PREFIXES) and not is_secret_name(k))}
    return env


def start_ray(worker_env: dict[str, str] | None = None) -> bool:
    """Join the cluster in RAY_ADDRESS, or start a local one; True when this call started it.

    `worker_env` is what the job's workers should see besides the forwarded variables (the CLI's quiet and
    offline settings). Ray's own log lines reach the console only with LMFORGE_VERBOSE=1."""
    import ray

    if ray.is_initialized():
        return False
    verbose = os.environ.get("LMFORGE_VERBOSE") == "1"
    if not os.environ.get("RAY_ADDRESS"):  # a cluster started just to tokenize stays on this machine
        use_loopback_only()
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=verbose,
             logging_level="INFO" if verbose else "ERROR",
             runtime_env={"env_vars": forwarded_env(dict(os.environ), worker_env)})
    return True


def quiet_ray_data() -> None:
    """Ray Data configures its own console handler at INFO when imported; keep it to errors unless verbose.

    Only the console handler: Ray Data's log file in the session directory keeps everything."""
    import logging

    if os.environ.get("LMFORGE_VERBOSE") == "1":
        return
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ == "PlainRayHandler" or type(handler) is logging.StreamHandler:
            handler.setLevel(logging.ERROR)


def stage_documents(cfg: DataConfig, seed: int, stats: Counter, engine: str, progress: bool, on_chunk=None,
                    sentences: bool = False):
    """Cleaned document pieces as chunks (object refs with Ray), and the split key of every document.

    `on_chunk` sees each chunk as soon as it is complete. With `sentences`, every piece is cut into its
    sentences, each its own piece of the same document (what pair and sentence samples are built from)."""
    from tqdm import tqdm

    if sentences:
        from data.segments import split_sentences
    cleaner, salt = Cleaner(cfg.clean, stats), seed.to_bytes(8, "little", signed=True)
    chunks, keys, rows, chars, key, in_doc = [], [], {"text": [], "cont": [], "key": []}, 0, 0, False

    def emit(rows: dict) -> None:
        chunks.append(to_chunk(rows, engine))
        if on_chunk:
            on_chunk(chunks[-1])

    for text, cont in tqdm(iter_documents(cfg, stats), desc="read+clean", unit=" docs", disable=not progress):
        whole = not cont and not in_doc
        if not in_doc:
            stats["documents_read"] += 1
        text = cleaner(text, whole)
        if text is not None:
            if not in_doc:  # every piece of a document carries its first piece's key: one split per document
                key = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, key=salt).digest(), "little")
                keys.append(key)
            pieces = split_sentences(text) or [text] if sentences else [text]
            for i, piece in enumerate(pieces):
                rows["text"].append(piece)
                rows["cont"].append(cont or i < len(pieces) - 1)
                rows["key"].append(key)
            chars += len(text)
            stats["chars_kept"] += len(text)
        in_doc = cont
        if chars >= CHUNK_CHARS:
            emit(rows)
            rows, chars = {"text": [], "cont": [], "key": []}, 0
    if rows["text"]:
        emit(rows)
    stats["documents_kept"] = len(keys)
    return chunks, np.asarray(keys, dtype=np.uint64)


@dataclass
class Chunk:
    """Cleaned document pieces in source order, with the split key of the document each belongs to."""

    text: list[str]
    cont: np.ndarray  # bool: the piece continues in the next one
    key: np.ndarray  # uint64


@dataclass
class TokenChunk:
    """A chunk after tokenizing: every piece's token ids back to back in `flat`, `lengths` apart."""

    flat: np.ndarray
    lengths: np.ndarray
    cont: np.ndarray
    key: np.ndarray

    def select(self, mask: np.ndarray) -> "TokenChunk":
        return TokenChunk(self.flat[np.repeat(mask, self.lengths)], self.lengths[mask], self.cont[mask],
                          self.key[mask])


def to_chunk(rows: dict, engine: str):
    chunk = Chunk(rows["text"], np.asarray(rows["cont"], dtype=bool), np.asarray(rows["key"], dtype=np.uint64))
    if engine != "ray":
        # Plain numpy in-process: pyarrow would import pandas (about 0.5 s) before the first chunk could start.
        return chunk
    import ray

    return ray.put(pa.table({"text": pa.array(chunk.text, pa.large_string()), "cont": chunk.cont,
                             "key": chunk.key}))


def fetch(chunk) -> Chunk:
    if isinstance(chunk, Chunk):
        return chunk
    import ray

    table = ray.get(chunk)
    return Chunk(table["text"].to_pylist(), np.asarray(table["cont"]), np.asarray(table["key"]))


def train_texts(chunks: list, val_below: int, limit: int):
    """Texts of the first `limit` training documents, for tokenizer training."""
    seen = 0
    for chunk in map(fetch, chunks):
        for text, train in zip(chunk.text, chunk.key > val_below):
            if train:
                yield text[:TRAIN_CHARS]
                seen += 1
                if seen >= limit:
                    return


def from_table(table: pa.Table) -> TokenChunk:
    ids = table["ids"].combine_chunks()
    return TokenChunk(ids.values.to_numpy(), np.diff(ids.offsets.to_numpy()), np.asarray(table["cont"]),
                      np.asarray(table["key"]))


class ThreadTokenizer:
    """Tokenizes chunks in a background thread as they are handed in, in order.

    The thread does only the tokenizer's own work, which releases the GIL and uses every core, so reading
    and cleaning the next chunks, and turning encodings into ids, packing and writing the previous ones
    happen meanwhile on this thread. At most `ahead` results wait unconsumed.
    """

    def __init__(self, tokenizer_json: str, ahead: int | None = None):
        self.tokenizer_json, self.ahead = tokenizer_json, ahead or LOCAL_AHEAD
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmforge-tokenize")
        self.running: deque = deque()
        self.waiting: deque = deque()

    def submit(self, chunk: Chunk) -> None:
        self.waiting.append(chunk)
        self._fill()

    def _fill(self) -> None:
        while self.waiting and len(self.running) < self.ahead:
            chunk = self.waiting.popleft()
            self.running.append((chunk, self.pool.submit(encodings, chunk.text, self.tokenizer_json)))

    def __iter__(self):
        try:
            while self.running:
                chunk, done = self.running.popleft()
                batch = done.result()
                self._fill()
                yield TokenChunk(*to_ids(batch), chunk.cont, chunk.key)
        finally:
            self.close()

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


def tokenize(chunks: list, tokenizer_json: str, engine: str):
    """Tokenized chunks in input order: through Ray Data across the cluster, or in this process."""
    if engine != "ray":
        local = ThreadTokenizer(tokenizer_json)
        for chunk in chunks:
            local.submit(chunk)
        return local
    import ray.data

    quiet_ray_data()
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.op_resource_reservation_enabled
    ctx.execution_options.preserve_order = True  # the order decides which duplicate and which block is first
    # Per-operator resource reservation is for multi-stage pipelines; with this single map stage it only
    # keeps tasks waiting, which halved tokenize throughput on a 2-CPU cluster.
    ctx.op_resource_reservation_enabled = False
    try:
        ds = ray.data.from_arrow_refs(chunks).map_batches(
            tokenize_table, batch_format="pyarrow", batch_size=None,
            fn_kwargs={"tokenizer_json": tokenizer_json}, num_cpus=1)
    finally:
        # The dataset keeps its own copy of the context; the caller's Ray Data work keeps its settings.
        ctx.execution_options.preserve_order, ctx.op_resource_reservation_enabled = saved
    return map(from_table, ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=4))


def make_builder(spec: SampleSpec, cfg: DataConfig, tokenizer, seed: int):
    """The sample builder for one split, as `spec` asks."""
    if spec.kind == "blocks":
        separator = tokenizer.eos_token_id if spec.separator == "eos" else tokenizer.sep_token_id
        wrap = (tokenizer.cls_token_id, tokenizer.sep_token_id) if spec.wrap else None
        return BlockBuilder(cfg.seq_len, separator, cfg.packed, wrap)
    from data.segments import PairBuilder, SegmentBuilder

    if spec.kind == "pairs":
        return PairBuilder(cfg.seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id, spec.random_next_prob,
                           spec.short_seq_prob, seed)
    return SegmentBuilder(cfg.seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id)


def pack_and_write(cfg: DataConfig, out: Path, tokenized, val_below: int, tokenizer, stats: Counter,
                   progress: bool, total: int, spec: SampleSpec = CAUSAL_BLOCKS, seed: int = 0) -> tuple[dict, dict]:
    from tqdm import tqdm

    dtype = token_dtype(len(tokenizer))
    shard_bytes = int(cfg.shard_mb * (1 << 20))
    builders = {s: make_builder(spec, cfg, tokenizer, seed + i) for i, s in enumerate(SPLITS)}
    writers = {s: ShardWriter(out, s, shard_bytes, field_dtypes(builders[s].fields, dtype)) for s in SPLITS}
    docs = Counter()
    for chunk in tqdm(tokenized, desc="tokenize+pack", unit=" chunks", total=total, disable=not progress):
        is_val = chunk.key <= val_below
        for split, mask in (("train", ~is_val), ("val", is_val)):
            if not mask.any():
                continue
            part = chunk.select(mask)
            docs[split] += int((~part.cont).sum())
            stats["tokens_from_documents"] += len(part.flat)
            for sample in builders[split].add(part.flat, part.lengths, part.cont):
                writers[split].write(sample)
    splits = {}
    for split in SPLITS:
        held, dropped = builders[split].finish()
        for sample in held:
            writers[split].write(sample)
        stats["tokens_dropped_last_block"] += dropped
        shards = writers[split].close()
        if writers[split].samples == 0:
            raise LmforgeError(f"data split '{split}' is shorter than one block of data.seq_len={cfg.seq_len} "
                               f"({docs[split]} documents); add data or raise data.val_fraction")
        splits[split] = {"documents": docs[split], "blocks": writers[split].samples,
                         "tokens": writers[split].tokens, "shards": shards}
    # The manifest's field dtypes: what the writers stored (every split has the same fields).
    return splits, {name: dtype.name for name, dtype in writers["train"].fields.items()}


def field_dtypes(fields: dict[str, str], token: np.dtype) -> dict[str, np.dtype]:
    """Token-id fields in the vocabulary's dtype; the others (labels, token types) as the builder says."""
    return {name: token if kind == "ids" else np.dtype(kind) for name, kind in fields.items()}


def build_from_tokens(cfg: DataConfig, out: Path, seed: int, stats: Counter) -> dict:
    """Pack flat token files into blocks and hold out a seeded random set of blocks for validation.

    No tokenizer is needed: the files declare their vocabulary size. A flat token stream already carries its
    own document boundaries, so nothing is inserted; and as blocks are all full, nothing is ever padded.
    A given tokenizer (kind=pretrained) is only kept beside the shards, so `generate` can decode.
    """
    from data.sources import expand_paths
    from data.tokenfiles import open_token_file

    files = [open_token_file(p, cfg) for p in expand_paths(cfg.paths, cfg.source)]
    tokenizer = None
    if cfg.tokenizer.kind == "pretrained":
        shutil.copytree(cfg.tokenizer.path, out / "tokenizer")
        tokenizer = load_tokenizer(out / "tokenizer")
    # The model's vocabulary covers both the files' ids and the tokenizer's (which may add special tokens).
    vocab = max([f.vocab_size for f in files] + ([len(tokenizer)] if tokenizer is not None else []))
    n_blocks = sum(len(f.tokens) for f in files) // cfg.seq_len
    if n_blocks < 2:
        raise LmforgeError(f"data: token files hold fewer than 2 blocks of data.seq_len={cfg.seq_len}")
    n_val = max(1, round(n_blocks * cfg.val_fraction))
    is_val = np.zeros(n_blocks, dtype=bool)
    is_val[np.random.default_rng(seed).choice(n_blocks, n_val, replace=False)] = True
    dtype, shard_bytes = token_dtype(vocab), int(cfg.shard_mb * (1 << 20))
    packer = StreamPacker(cfg.seq_len, None, packed=True)
    writers = {s: ShardWriter(out, s, shard_bytes, {"input_ids": dtype}) for s in SPLITS}
    block = 0
    for f in files:
        stats["files"] += 1
        for start in range(0, len(f.tokens), 1 << 22):
            piece = np.asarray(f.tokens[start:start + (1 << 22)])
            for sample in packer.add(piece, np.asarray([len(piece)]), np.asarray([True])):
                writers["val" if is_val[block] else "train"].write({"input_ids": sample})
                block += 1
    stats["tokens_dropped_last_block"] = packer.finish()
    splits = {}
    for split in SPLITS:
        shards = writers[split].close()
        splits[split] = {"documents": 0, "blocks": writers[split].samples, "tokens": writers[split].tokens,
                         "shards": shards}
    return vocabulary_fields(tokenizer, vocab, out) | {"splits": splits, "counts": dict(stats), "engine": "local"}
