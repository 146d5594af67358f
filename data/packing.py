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
