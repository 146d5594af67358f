"""Build a prepared corpus: read and clean, split, train a tokenizer, tokenize (Ray Data or local), pack, shard.

Stages, each bounded in driver memory:
1. read + clean on the driver, in source order (first of a duplicate wins), into ~2 MB Arrow chunks; with
   the Ray engine each chunk goes straight to the object store.
2. split whole documents into train/val by a seeded hash rank, and train the tokenizer on train documents.
3. tokenize the chunks with Ray Data `map_batches` across the cluster (or in this process for small
   corpora), streamed back in order, so packing overlaps tokenization.
4. pack each split and write WebDataset shards; the manifest records counts, drops, checksums and config.
"""

import hashlib
import os
import shutil
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa

from data.clean import Cleaner
from data.config import DataConfig
from data.packing import StreamPacker, token_dtype
from data.shards import ShardWriter
from data.sources import iter_documents
from data.tokenizer import train_tokenizer
from orchestrator.errors import LmforgeError

CHUNK_CHARS = 2_000_000  # text per Arrow chunk: one Ray Data block, one tokenize task
# BPE training cost grows with the longest whitespace-free run (minified code, base64): sample heads only.
TRAIN_CHARS = 20_000
SPLITS = ("train", "val")


def build(cfg: DataConfig, out: Path, seed: int, engine: str, progress: bool) -> dict:
    """Write shards and tokenizer into `out`; return the manifest (not yet written)."""
    started, stats = time.time(), Counter()
    if cfg.source == "tokens":
        return build_from_tokens(cfg, out, seed, stats) | {"seconds": round(time.time() - started, 3)}
    started_ray = engine == "ray" and start_ray()
    try:
        chunks, keys = stage_documents(cfg, seed, stats, engine, progress)
        if len(keys) < 2:
            raise LmforgeError(f"data: only {len(keys)} document(s) left after cleaning "
                               f"({dict(stats)}); need at least 2 for a train/val split")
        n_val = max(1, round(len(keys) * cfg.val_fraction))
        val_below = np.partition(keys, n_val - 1)[n_val - 1]  # keys <= this are validation documents
        tokenizer = train_tokenizer(train_texts(chunks, val_below, cfg.tokenizer.train_docs), cfg.tokenizer)
        tokenizer.save_pretrained(str(out / "tokenizer"))
        tokenized = tokenize(chunks, tokenizer.backend_tokenizer.to_str(), engine)
        splits = pack_and_write(cfg, out, tokenized, val_below, tokenizer, stats, progress, len(chunks))
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    tok_hash = hashlib.sha256((out / "tokenizer" / "tokenizer.json").read_bytes()).hexdigest()
    return {"vocab_size": len(tokenizer), "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id,
            "tokenizer_sha256": tok_hash, "splits": splits, "counts": dict(sorted(stats.items())),
            "engine": engine, "seconds": round(time.time() - started, 3)}


def start_ray() -> bool:
    """Join the cluster in RAY_ADDRESS, or start a local one; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    env = {k: v for k, v in os.environ.items() if k.startswith(("RAY_", "TOKENIZERS_", "HF_"))}
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False,
             log_to_driver=os.environ.get("LMFORGE_VERBOSE") == "1", runtime_env={"env_vars": env})
    return True


def stage_documents(cfg: DataConfig, seed: int, stats: Counter, engine: str, progress: bool):
    """Cleaned document pieces as Arrow chunks (or object refs), and the split key of every document."""
    from tqdm import tqdm

    cleaner, salt = Cleaner(cfg.clean, stats), seed.to_bytes(8, "little", signed=True)
    chunks, keys, rows, chars, key, in_doc = [], [], {"text": [], "cont": [], "key": []}, 0, 0, False
    for text, cont in tqdm(iter_documents(cfg, stats), desc="read+clean", unit=" docs", disable=not progress):
        whole = not cont and not in_doc
        if not in_doc:
            stats["documents_read"] += 1
        text = cleaner(text, whole)
        if text is not None:
            if not in_doc:  # every piece of a document carries its first piece's key: one split per document
                key = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, key=salt).digest(), "little")
                keys.append(key)
            rows["text"].append(text)
            rows["cont"].append(cont)
            rows["key"].append(key)
            chars += len(text)
            stats["chars_kept"] += len(text)
        in_doc = cont
        if chars >= CHUNK_CHARS:
            chunks.append(to_chunk(rows, engine))
            rows, chars = {"text": [], "cont": [], "key": []}, 0
    if rows["text"]:
        chunks.append(to_chunk(rows, engine))
    stats["documents_kept"] = len(keys)
    return chunks, np.asarray(keys, dtype=np.uint64)


def to_chunk(rows: dict, engine: str):
    table = pa.table({"text": pa.array(rows["text"], pa.large_string()), "cont": pa.array(rows["cont"]),
                      "key": pa.array(rows["key"], pa.uint64())})
    if engine == "ray":
        import ray

        return ray.put(table)
    return table


def fetch(chunk) -> pa.Table:
    if isinstance(chunk, pa.Table):
        return chunk
    import ray

    return ray.get(chunk)


def train_texts(chunks: list, val_below: int, limit: int):
    """Texts of the first `limit` training documents, for tokenizer training."""
    seen = 0
    for chunk in chunks:
        table = fetch(chunk)
        is_train = np.asarray(table["key"]) > val_below
        for text, train in zip(table["text"].to_pylist(), is_train):
            if train:
                yield text[:TRAIN_CHARS]
                seen += 1
                if seen >= limit:
                    return


@lru_cache(maxsize=2)
def backend(tokenizer_json: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


def tokenize_table(table: pa.Table, tokenizer_json: str) -> pa.Table:
    """One Ray Data batch: text in, uint32 token id lists out, other columns passed through."""
    tok = backend(tokenizer_json)
    texts = table["text"].to_pylist()
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    ids = pa.array([e.ids for e in encode(texts, add_special_tokens=False)], pa.large_list(pa.uint32()))
    return pa.table({"ids": ids, "cont": table["cont"], "key": table["key"]})


def tokenize(chunks: list, tokenizer_json: str, engine: str):
    """Tokenized chunks in input order: through Ray Data across the cluster, or in this process."""
    if engine != "ray":
        return (tokenize_table(chunk, tokenizer_json) for chunk in chunks)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the order decides which duplicate and which block is first
    ds = ray.data.from_arrow_refs(chunks).map_batches(
        tokenize_table, batch_format="pyarrow", batch_size=None, fn_kwargs={"tokenizer_json": tokenizer_json},
        num_cpus=1)
    return ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=4)


def pack_and_write(cfg: DataConfig, out: Path, tokenized, val_below: int, tokenizer, stats: Counter,
                   progress: bool, total: int) -> dict:
    from tqdm import tqdm

    dtype = token_dtype(len(tokenizer))
    shard_bytes = int(cfg.shard_mb * (1 << 20))
    packers = {s: StreamPacker(cfg.seq_len, tokenizer.eos_token_id, cfg.packed) for s in SPLITS}
    writers = {s: ShardWriter(out, s, shard_bytes, dtype) for s in SPLITS}
    docs = Counter()
    for table in tqdm(tokenized, desc="tokenize+pack", unit=" chunks", total=total, disable=not progress):
        is_val = np.asarray(table["key"]) <= val_below
        for split, mask in (("train", ~is_val), ("val", is_val)):
            part = table.filter(pa.array(mask))
            if part.num_rows == 0:
                continue
            ids = part["ids"].combine_chunks()
            flat = ids.values.to_numpy(zero_copy_only=False)
            lengths = np.diff(ids.offsets.to_numpy())
            conts = np.asarray(part["cont"])
            docs[split] += int((~conts).sum())
            stats["tokens_from_documents"] += len(flat)
            for sample in packers[split].add(flat, lengths, conts):
                writers[split].write(sample)
    splits = {}
    for split in SPLITS:
        stats["tokens_dropped_last_block"] += packers[split].finish()
        shards = writers[split].close()
        if writers[split].samples == 0:
            raise LmforgeError(f"data split '{split}' is shorter than one block of data.seq_len={cfg.seq_len} "
                               f"({docs[split]} documents); add data or raise data.val_fraction")
        splits[split] = {"documents": docs[split], "blocks": writers[split].samples,
                         "tokens": writers[split].tokens, "shards": shards}
    return splits


def build_from_tokens(cfg: DataConfig, out: Path, seed: int, stats: Counter) -> dict:
    """Pack flat token files into blocks and hold out a seeded random set of blocks for validation."""
    from data.sources import expand_paths
    from data.tokenfiles import open_token_file

    files = [open_token_file(p, cfg) for p in expand_paths(cfg.paths, cfg.source)]
    vocab = max(f.vocab_size for f in files)
    n_blocks = sum(len(f.tokens) for f in files) // cfg.seq_len
    if n_blocks < 2:
        raise LmforgeError(f"data: token files hold fewer than 2 blocks of data.seq_len={cfg.seq_len}")
    n_val = max(1, round(n_blocks * cfg.val_fraction))
    is_val = np.zeros(n_blocks, dtype=bool)
    is_val[np.random.default_rng(seed).choice(n_blocks, n_val, replace=False)] = True
    if cfg.tokenizer.kind == "pretrained":
        shutil.copytree(cfg.tokenizer.path, out / "tokenizer")
    dtype, shard_bytes = token_dtype(vocab), int(cfg.shard_mb * (1 << 20))
    packer = StreamPacker(cfg.seq_len, 0, packed=True)
    writers = {s: ShardWriter(out, s, shard_bytes, dtype) for s in SPLITS}
    block = 0
    for f in files:
        stats["files"] += 1
        for start in range(0, len(f.tokens), 1 << 22):
            piece = np.asarray(f.tokens[start:start + (1 << 22)])
            for sample in packer.add(piece, np.asarray([len(piece)]), np.asarray([True])):
                writers["val" if is_val[block] else "train"].write(sample)
                block += 1
    stats["tokens_dropped_last_block"] = packer.finish()
    splits = {}
    for split in SPLITS:
        shards = writers[split].close()
        splits[split] = {"documents": 0, "blocks": writers[split].samples, "tokens": writers[split].tokens,
                         "shards": shards}
    return {"vocab_size": vocab, "eos_id": None, "pad_id": 0, "tokenizer_sha256": None, "splits": splits,
            "counts": dict(stats), "engine": "local"}
