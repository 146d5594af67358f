"""Pre-tokenized flat binary token files, as nanoGPT, llm.c and Megatron-style pipelines write them.

A file is a flat array of uint16 or uint32 token ids. Its dtype and vocabulary come from, in order:
- a sidecar `<file>.json` such as {"dtype": "uint16", "vocab_size": 50257, "header_bytes": 0};
- an llm.c header: 256 int32, magic 20240520 (GPT-2, uint16) or 20240801 (Llama 3, uint32), then the count;
- `data.token_dtype` and `data.token_vocab_size`.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import LmforgeError
from data.config import DataConfig

LLMC_HEADER_BYTES = 256 * 4
LLMC_MAGIC = {20240520: ("uint16", 50257), 20240801: ("uint32", 128256)}
CHECK_CHUNK = 1 << 24  # tokens per pass when checking ids against the vocabulary


@dataclass
class TokenFile:
    path: str
    tokens: np.ndarray  # read-only memory map of the token ids
    vocab_size: int


def open_token_file(path: str, cfg: DataConfig) -> TokenFile:
    size = Path(path).stat().st_size
    if size == 0:
        raise LmforgeError(f"{path}: file is empty")
    dtype, vocab, header = describe(path, size, cfg)
    itemsize = np.dtype(dtype).itemsize
    if (size - header) % itemsize:
        raise LmforgeError(f"{path}: {size - header} data bytes is not a whole number of {dtype} tokens; "
                           f"the file is truncated or data.token_dtype is wrong")
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=header)
    for start in range(0, len(tokens), CHECK_CHUNK):
        top = int(tokens[start:start + CHECK_CHUNK].max())
        if top >= vocab:
            at = start + int(np.argmax(tokens[start:start + CHECK_CHUNK] >= vocab))
            raise LmforgeError(f"{path}: token {top} at position {at} is outside the vocabulary of {vocab}; "
                               f"the file is corrupt or its dtype/vocab_size is wrong")
    return TokenFile(path, tokens, vocab)


def describe(path: str, size: int, cfg: DataConfig) -> tuple[str, int, int]:
    """(dtype, vocab_size, header_bytes) of a token file."""
    sidecar = Path(path + ".json")
    if sidecar.is_file():
        try:
            meta = json.loads(sidecar.read_text())
            return meta["dtype"], int(meta["vocab_size"]), int(meta.get("header_bytes", 0))
        except (ValueError, KeyError, TypeError) as e:
            raise LmforgeError(f"{sidecar}: needs JSON keys dtype and vocab_size ({e})") from None
    if size >= LLMC_HEADER_BYTES:
        header = np.fromfile(path, dtype=np.int32, count=256)
        if int(header[0]) in LLMC_MAGIC:
            dtype, vocab = LLMC_MAGIC[int(header[0])]
            expected = LLMC_HEADER_BYTES + int(header[2]) * np.dtype(dtype).itemsize
            if size != expected:
                raise LmforgeError(f"{path}: llm.c header promises {int(header[2])} tokens ({expected} bytes) "
                                   f"but the file has {size} bytes; it is truncated")
            return dtype, cfg.token_vocab_size or vocab, LLMC_HEADER_BYTES
    if cfg.token_dtype == "auto" or cfg.token_vocab_size is None:
        raise LmforgeError(f"{path}: no {sidecar.name} sidecar and no llm.c header; set data.token_dtype "
                           f"and data.token_vocab_size")
    return cfg.token_dtype, cfg.token_vocab_size, 0
