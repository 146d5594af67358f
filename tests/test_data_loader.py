"""Per-rank loading covers each epoch exactly once and resumes at exactly the next sample, on any world size."""

import numpy as np
import pytest

from data.loader import ResumableLoader, epoch_order
from data.prepared import open_split, prepare_training_data
from orchestrator.config import load_config


class IdStore:
    """Sample i is a row of `seq_len` copies of i, so a batch says exactly which samples it holds."""

    def __init__(self, n: int, seq_len: int = 4, shard_sizes=None):
        self.n, self.seq_len = n, seq_len
        if shard_sizes is not None:
            self.shard_sizes = np.asarray(shard_sizes)
            assert self.shard_sizes.sum() == n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"input_ids": np.full(self.seq_len, i, dtype=np.int64)}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cfg = load_config(["experiment=smoke", "data.shard_mb=0.25"])  # several shards from the small corpus
    return prepare_training_data(cfg.data, tmp_path_factory.mktemp("root"), cfg.seed)


def ids_of(batch: list[dict]) -> list[int]:
    return [int(sample["input_ids"][0]) for sample in batch]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("shards", [None, [10] * 12 + [7]], ids=["one-shard", "13-shards"])
def test_ranks_cover_one_epoch_exactly_and_disjointly(world_size, shards):
    store, batch = IdStore(127, shard_sizes=shards), 3
    steps = len(store) // (batch * world_size)  # whole global batches in one epoch
    seen = {r: [] for r in range(world_size)}
    for rank in range(world_size):
        loader = ResumableLoader(store, batch, rank, world_size, seed=7)
        for _ in range(steps):
            seen[rank].extend(ids_of(loader.next_batch()))
    union = [i for r in seen for i in seen[r]]
    assert len(union) == len(set(union)), "a sample went to two ranks or twice to one"
    assert sorted(union) == sorted(epoch_order(127, 0, 7, True, shards)[: steps * batch * world_size])
    # The leftover that does not fill a global batch is the start of the next step, not lost:
    loader = ResumableLoader(store, batch, 0, 1, seed=7)
    everything = [i for _ in range(-(-127 // batch)) for i in ids_of(loader.next_batch())]
    assert sorted(everything[:127]) == list(range(127))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_real_shards_union_is_the_epoch(prepared, world_size):
    store = open_split(prepared, "train")
    assert len(store.shard_sizes) > 1
    batch = 8
    steps = len(store) // (batch * world_size)
    rows = []
    for rank in range(world_size):
        loader = ResumableLoader(store, batch, rank, world_size, seed=1)
        rows += [tuple(s["input_ids"].tolist()) for _ in range(steps) for s in loader.next_batch()]
    assert len(rows) == steps * batch * world_size
    epoch = [tuple(store[int(i)]["input_ids"].tolist()) for i in epoch_order(len(store), 0, 1, True, store.shard_sizes)]
    assert sorted(rows) == sorted(epoch[: len(rows)])


def test_epochs_are_reshuffled_and_each_is_a_permutation():
    shards = [16] * 20
    first, second = (epoch_order(320, e, 3, True, shards) for e in (0, 1))
    assert sorted(first) == sorted(second) == list(range(320))
    assert not np.array_equal(first, second)
    assert np.array_equal(first, epoch_order(320, 0, 3, True, shards)), "the order must be a pure function"


@pytest.mark.parametrize("n_batches", [0, 5, 41])  # 41 batches of 3x2 crosses the epoch boundary at 127
def test_resume_after_n_batches_gives_identical_next_batches(prepared, n_batches):
    store = open_split(prepared, "train")
    for rank in range(2):
        straight = ResumableLoader(store, 3, rank, 2, seed=5)
        for _ in range(n_batches):
            straight.next_batch()
        state = straight.state_dict()
        expected = [straight.next_batch() for _ in range(8)]
        resumed = ResumableLoader(store, 3, rank, 2, seed=0)  # seed comes back from the state
        resumed.load_state_dict(state)
        for want in expected:
            got = resumed.next_batch()
            assert [s["sample_id"] for s in got] == [s["sample_id"] for s in want]
            assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(got, want))


def test_resume_on_fewer_ranks_covers_rest_of_epoch_exactly_once():
    store, batch = IdStore(120, shard_sizes=[12] * 10), 4
    two = [ResumableLoader(store, batch, r, 2, seed=11) for r in range(2)]
    before = [i for _ in range(6) for loader in two for i in ids_of(loader.next_batch())]
    state = two[0].state_dict()
    assert state == two[1].state_dict(), "the state must not depend on the rank"
    one = ResumableLoader(store, batch, 0, 1, seed=11)
    one.load_state_dict(state)
    after = [i for _ in range((120 - len(before)) // batch) for i in ids_of(one.next_batch())]
    assert sorted(before + after) == list(range(120))
    assert one.epoch == 1 and one.state_dict()["offset"] == 0


def test_state_from_other_data_is_refused(prepared):
    loader = ResumableLoader(IdStore(50), 2, 0, 1, seed=0)
    with pytest.raises(Exception, match="prepared data changed"):
        loader.load_state_dict(ResumableLoader(IdStore(60), 2, 0, 1, seed=0).state_dict())


def test_packed_batches_are_full_blocks_of_token_ids(prepared):
    store = open_split(prepared, "val")
    batch = ResumableLoader(store, 4, 0, 1, seed=0, shuffle=False).next_batch()
    assert len(batch) == 4 and all(s["input_ids"].shape == (64,) for s in batch)
    assert np.array_equal(batch[1]["input_ids"], store[1]["input_ids"])
    assert [(s["sample_id"], s["epoch"]) for s in batch] == [(0, 0), (1, 0), (2, 0), (3, 0)]


def test_unpacked_samples_come_at_their_real_length(tmp_path):
    """The store and loader never pad: which positions are padding is the collator's to know, by length."""
    import json

    from data_helpers import make_cfg, make_docs

    docs = make_docs(12, words=5) + make_docs(2, seed=3, words=40)  # short ones, and two that fill a block
    (tmp_path / "u.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    out = prepare_training_data(make_cfg("jsonl", [tmp_path / "u.jsonl"], packed=False), tmp_path / "root", 0)
    store = open_split(out, "train")
    lengths = {len(store[i]["input_ids"]) for i in range(len(store))}
    assert max(lengths) == 32 and min(lengths) < 32, "short documents must not be padded to seq_len"
    batch = ResumableLoader(store, len(store), 0, 1, seed=0, shuffle=False).next_batch()
    assert [len(s["input_ids"]) for s in batch] == [len(store[i]["input_ids"]) for i in range(len(store))]
