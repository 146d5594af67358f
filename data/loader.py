"""Deterministic, resumable per-rank batching over a global sample stream.

The stream is the concatenation of seeded per-epoch orders of all samples. Global micro-batch m covers
stream positions [m*W*B, (m+1)*W*B) and rank r takes its B-slice of that window. The only state is the
stream position (epoch = position // N, offset = position % N), plus the seed; it does not depend on the
world size W. So a run saved with 2 ranks resumes on 1 rank (or 3) at exactly the next sample, and within
an epoch every sample is seen exactly once: ranks are disjoint, and their union is the epoch.

The epoch order is shard-aware when the store has `shard_sizes` (prepared WebDataset shards): the shards
are permuted, then samples are shuffled within each window of `shuffle_shards` consecutive shards. That
is a seeded shuffle buffer of whole shards that changes every epoch, and it is still a permutation of all
samples, so the guarantees above hold; reads stay within a few memory-mapped shards at a time.

Deliberately not done: giving each rank its own shards. That ties the order to W and makes resuming on a
different world size either repeat or skip samples.
"""

from collections.abc import Iterator
from typing import Protocol

import numpy as np

from common.errors import LmforgeError

SHUFFLE_SHARDS = 8  # shards mixed together by the epoch shuffle; more mixes better, reads more widely


class SampleStore(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...


def epoch_order(num_samples: int, epoch: int, seed: int, shuffle: bool, shard_sizes=None,
                shuffle_shards: int = SHUFFLE_SHARDS) -> np.ndarray:
    """The sample ids of one epoch, in stream order: a pure function of its arguments."""
    if not shuffle:
        return np.arange(num_samples)
    rng = np.random.default_rng([seed, epoch])
    if shard_sizes is None or len(shard_sizes) <= shuffle_shards:
        return rng.permutation(num_samples)
    starts = np.concatenate([[0], np.cumsum(shard_sizes)])
    order = rng.permutation(len(shard_sizes))
    windows = []
    for i in range(0, len(order), shuffle_shards):
        ids = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in order[i:i + shuffle_shards]])
        windows.append(rng.permutation(ids))
    return np.concatenate(windows)


class ResumableLoader:
    """Yields micro-batches for one rank, each a list of `micro_batch_size` samples: the store's dict of
    arrays at their real lengths, plus the sample's global id and the epoch it is drawn in (what its random
    masking is seeded by). The objective's collator pads them; `state_dict` resumes exactly."""

    def __init__(self, store: SampleStore, micro_batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: bool = True):
        if len(store) < micro_batch_size * world_size:
            raise LmforgeError(f"{len(store)} samples cannot fill one global batch of "
                               f"{micro_batch_size} x {world_size} ranks; add data or shrink the batch")
        self.store, self.micro_batch_size = store, micro_batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.position = 0  # global samples consumed, summed over ranks
        self._order_epoch, self._order = -1, None

    @property
    def epoch(self) -> int:
        return self.position // len(self.store)

    def state_dict(self) -> dict:
        n = len(self.store)
        return {"position": self.position, "seed": self.seed, "num_samples": n,
                "epoch": self.position // n, "offset": self.position % n}  # epoch, offset: for humans

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != len(self.store):
            raise LmforgeError(f"loader state is for {state['num_samples']} samples, data has {len(self.store)}: "
                               f"the prepared data changed since the checkpoint was written")
        self.position, self.seed = state["position"], state["seed"]

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order_epoch = epoch
            self._order = epoch_order(len(self.store), epoch, self.seed, self.shuffle,
                                      getattr(self.store, "shard_sizes", None))
        return self._order

    def sample_ids(self, start: int, count: int) -> np.ndarray:
        """Global sample ids at stream positions [start, start + count), which may cross epochs."""
        n, ids = len(self.store), []
        while count > 0:
            epoch, offset = divmod(start, n)
            take = min(count, n - offset)
            ids.append(self._epoch_order(epoch)[offset:offset + take])
            start, count = start + take, count - take
        return np.concatenate(ids)

    def next_batch(self) -> list[dict]:
        window, n = self.micro_batch_size * self.world_size, len(self.store)
        start = self.position + self.rank * self.micro_batch_size
        mine = self.sample_ids(start, self.micro_batch_size)
        self.position += window
        return [self.store[int(i)] | {"sample_id": int(i), "epoch": (start + k) // n} for k, i in enumerate(mine)]

    def __iter__(self) -> Iterator[list[dict]]:
        while True:
            yield self.next_batch()


def eval_plan(n_blocks: int, micro_batch_size: int, eval_batches: int, world_size: int) -> tuple[int, int]:
    """(batch size, batches per rank) for evaluating a split of `n_blocks`: with an unshuffled loader the ranks
    together score its first batch * batches * world_size blocks; smaller batches when the split is small."""
    batch_size = min(micro_batch_size, max(1, n_blocks // world_size))
    return batch_size, max(1, min(eval_batches, n_blocks // (batch_size * world_size)))
