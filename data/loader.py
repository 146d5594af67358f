"""Deterministic, resumable per-rank batching over a global sample stream.

The stream is the concatenation of seeded per-epoch permutations of all samples. Global micro-batch m
covers stream positions [m*W*B, (m+1)*W*B) and rank r takes its B-slice of that window. The only state
is the stream position, which does not depend on the world size W: a run saved with 2 ranks resumes on 1
rank (or 3) at exactly the next sample, and within an epoch every sample is seen exactly once.
"""

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch


class SampleStore(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...


def epoch_order(num_samples: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_samples)
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


class ResumableLoader:
    """Yields LongTensor batches [micro_batch_size, seq_len] for one rank; `state_dict` resumes exactly."""

    def __init__(self, store: SampleStore, micro_batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: bool = True):
        if len(store) < micro_batch_size * world_size:
            raise ValueError(f"{len(store)} samples cannot fill one global batch of "
                             f"{micro_batch_size} x {world_size} ranks")
        self.store, self.micro_batch_size = store, micro_batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.position = 0  # global samples consumed, summed over ranks
        self._order_epoch, self._order = -1, None

    @property
    def epoch(self) -> int:
        return self.position // len(self.store)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "num_samples": len(self.store)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != len(self.store):
            raise ValueError(f"loader state is for {state['num_samples']} samples, data has {len(self.store)}")
        self.position, self.seed = state["position"], state["seed"]

    def sample_ids(self, start: int, count: int) -> np.ndarray:
        """Global sample ids at stream positions [start, start + count)."""
        n = len(self.store)
        ids = []
        for pos in range(start, start + count):
            epoch = pos // n
            if epoch != self._order_epoch:
                self._order_epoch, self._order = epoch, epoch_order(n, epoch, self.seed, self.shuffle)
            ids.append(self._order[pos % n])
        return np.asarray(ids)

    def next_batch(self) -> torch.Tensor:
        window = self.micro_batch_size * self.world_size
        mine = self.sample_ids(self.position + self.rank * self.micro_batch_size, self.micro_batch_size)
        self.position += window
        return torch.from_numpy(np.stack([np.asarray(self.store[int(i)], dtype=np.int64) for i in mine]))

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()
