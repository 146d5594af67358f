"""Pack tokenized documents into fixed-length blocks with a separator between documents."""

import numpy as np


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


class StreamPacker:
    """Turn tokenized document pieces into samples, batch by batch, in bounded memory.

    Packed: documents joined by `separator_id` and cut into `seq_len` blocks; a document longer than a
    block runs on into the next one, and only the ragged tail of the whole split is dropped. Unpacked:
    each document (plus separator) becomes its own samples of at most `seq_len` tokens, split where longer.
    A piece with `cont=True` continues in the next piece, so no separator goes between them; with
    `separator_id=None` none goes anywhere (a token stream that already carries its own boundaries).
    """

    def __init__(self, seq_len: int, separator_id: int | None, packed: bool):
        self.seq_len, self.separator_id, self.packed = seq_len, separator_id, packed
        self.carry = np.empty(0, dtype=np.int64)
        self.pending: list[np.ndarray] = []

    def add(self, flat: np.ndarray, lengths: np.ndarray, conts: np.ndarray) -> list[np.ndarray]:
        """Samples completed by these pieces: `flat` holds them back to back, `lengths` says where they end."""
        if self.packed:
            ids = flat.astype(np.int64)
            if self.separator_id is not None:
                ids = np.insert(ids, np.cumsum(lengths)[~np.asarray(conts, dtype=bool)], self.separator_id)
            stream = np.concatenate([self.carry, ids])
            n = len(stream) // self.seq_len
            self.carry = stream[n * self.seq_len:]
            return list(stream[: n * self.seq_len].reshape(n, self.seq_len))
        samples, start = [], 0
        for length, cont in zip(lengths, conts):
            self.pending.append(flat[start:start + length].astype(np.int64))
            start += length
            if not cont:
                end = [] if self.separator_id is None else [self.separator_id]
                doc = np.concatenate([*self.pending, np.asarray(end, dtype=np.int64)])
                samples.extend(doc[i:i + self.seq_len] for i in range(0, len(doc), self.seq_len))
                self.pending = []
        return samples

    def finish(self) -> int:
        """Tokens left over that do not fill a block; packed mode drops them."""
        return len(self.carry) + sum(len(p) for p in self.pending)
