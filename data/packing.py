"""Pack tokenized documents into fixed-length blocks with a separator between documents."""

from collections.abc import Iterable

import numpy as np


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def pack_documents(token_ids: Iterable[list[int]], seq_len: int, separator_id: int,
                   dtype=np.uint32) -> np.ndarray:
    """Concatenate documents, each followed by `separator_id`, and cut into [n_blocks, seq_len].

    Documents longer than a block simply run across blocks; the ragged tail is dropped.
    """
    stream = []
    for ids in token_ids:
        stream.extend(ids)
        stream.append(separator_id)
    n_blocks = len(stream) // seq_len
    return np.asarray(stream[: n_blocks * seq_len], dtype=dtype).reshape(n_blocks, seq_len)


class StreamPacker:
    """Turn tokenized document pieces into samples, batch by batch, in bounded memory.

    Packed: documents joined by `separator_id` and cut into `seq_len` blocks; a document longer than a
    block runs on into the next one, and only the ragged tail of the whole split is dropped. Unpacked:
    each document (plus separator) becomes its own samples of at most `seq_len` tokens, split where longer.
    A piece with `cont=True` continues in the next piece, so no separator goes between them.
    """

    def __init__(self, seq_len: int, separator_id: int, packed: bool):
        self.seq_len, self.separator_id, self.packed = seq_len, separator_id, packed
        self.carry = np.empty(0, dtype=np.int64)
        self.pending: list[np.ndarray] = []

    def add(self, flat: np.ndarray, lengths: np.ndarray, conts: np.ndarray) -> list[np.ndarray]:
        """Samples completed by these pieces: `flat` holds them back to back, `lengths` says where they end."""
        if self.packed:
            ends = np.cumsum(lengths)[~np.asarray(conts, dtype=bool)]
            stream = np.concatenate([self.carry, np.insert(flat.astype(np.int64), ends, self.separator_id)])
            n = len(stream) // self.seq_len
            self.carry = stream[n * self.seq_len:]
            return list(stream[: n * self.seq_len].reshape(n, self.seq_len))
        samples, start = [], 0
        for length, cont in zip(lengths, conts):
            self.pending.append(flat[start:start + length].astype(np.int64))
            start += length
            if not cont:
                doc = np.concatenate([*self.pending, [self.separator_id]])
                samples.extend(doc[i:i + self.seq_len] for i in range(0, len(doc), self.seq_len))
                self.pending = []
        return samples

    def finish(self) -> int:
        """Tokens left over that do not fill a block; packed mode drops them."""
        return len(self.carry) + sum(len(p) for p in self.pending)
