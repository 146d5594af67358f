"""Driver-side preparation of training data, cached by config hash, and worker-side opening of splits.

A prepared directory holds `tokenizer/`, one packed block file per split and `meta.json`. The driver
builds it once; every worker memory-maps it instead of re-tokenizing.
"""

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from data.config import DataConfig
from data.corpus import embedded_documents, split_documents
from data.packing import pack_documents, token_dtype
from data.tokenizer import load_tokenizer, train_tokenizer
from orchestrator.errors import LmforgeError

FORMAT_VERSION = 1


def data_key(cfg: DataConfig, seed: int) -> str:
    blob = json.dumps({"data": asdict(cfg), "seed": seed, "format": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare_training_data(cfg: DataConfig, root: str | Path, seed: int) -> Path:
    """Return the prepared directory for `cfg`, building it if this exact config was never prepared."""
    out = Path(root) / "data" / f"{cfg.name}-{data_key(cfg, seed)}"
    if (out / "meta.json").is_file():
        return out
    if cfg.source != "embedded":
        raise LmforgeError(f"data.source={cfg.source} needs `lmforge data prepare` support, not available yet")
    train_docs, val_docs = split_documents(embedded_documents(), cfg.val_fraction, seed)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = train_tokenizer(train_docs, cfg.tokenizer)
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    dtype = token_dtype(len(tokenizer))
    counts = {}
    for split, docs in (("train", train_docs), ("val", val_docs)):
        ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
        blocks = pack_documents(ids, cfg.seq_len, tokenizer.eos_token_id, dtype)
        if len(blocks) == 0:
            raise LmforgeError(f"data split '{split}' is shorter than one block of data.seq_len={cfg.seq_len}")
        np.save(tmp / f"{split}.npy", blocks)
        counts[split] = {"documents": len(docs), "blocks": len(blocks), "tokens": int(blocks.size)}
    meta = {"format": FORMAT_VERSION, "seq_len": cfg.seq_len, "vocab_size": len(tokenizer),
            "source": cfg.source, "splits": counts, "config": asdict(cfg)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    # Rename is atomic, so a crash or a concurrent prepare never leaves a half-written directory in use.
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_meta(prepared: str | Path) -> dict:
    return json.loads((Path(prepared) / "meta.json").read_text())


def open_split(prepared: str | Path, split: str) -> np.ndarray:
    """A read-only memory map of packed blocks [n_blocks, seq_len] for `split` (train or val)."""
    return np.load(Path(prepared) / f"{split}.npy", mmap_mode="r")


def open_tokenizer(prepared: str | Path):
    return load_tokenizer(Path(prepared) / "tokenizer")
