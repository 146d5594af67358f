"""The same sample gets the same mask (MLM) and the same noise (span corruption) whether one worker or two
train on the data, and whether a run resumes mid-epoch: the randomness follows (seed, epoch, sample id)
through the real loader, never a per-rank stream."""

import numpy as np
import pytest
import torch

from data.loader import ResumableLoader
from data.prepared import Vocabulary
from model.objectives.config import ObjectiveConfig
from model.objectives.mlm import MaskedLM
from model.objectives.span_corruption import SpanCorruption

PAD, EOS, CLS, SEP, MASK = range(5)
SENTINELS = tuple(range(200, 300))
VOCAB = Vocabulary(size=300, bos_id=EOS, eos_id=EOS, pad_id=PAD, mask_id=MASK, cls_id=CLS, sep_id=SEP,
                   special_ids=(PAD, EOS, CLS, SEP, MASK, *SENTINELS), sentinel_ids=SENTINELS)


class BlockStore:
    """60 random token blocks of length 32."""

    def __init__(self):
        self.blocks = np.random.default_rng(0).integers(5, 200, size=(60, 32)).astype(np.uint16)
        self.blocks[:, 0], self.blocks[:, -1] = CLS, SEP

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i]}


def drawn(objective, world_size: int, batch: int, steps: int, resume_at: int | None = None) -> dict:
    """sample id (per epoch) -> the model inputs its collated row received, over `steps` global batches."""
    store, seen = BlockStore(), {}
    loaders = [ResumableLoader(store, batch, r, world_size, seed=3) for r in range(world_size)]
    for step in range(steps):
        if step == resume_at:  # a resume: fresh loaders from the saved state
            state = loaders[0].state_dict()
            loaders = [ResumableLoader(store, batch, r, world_size, seed=3) for r in range(world_size)]
            for loader in loaders:
                loader.load_state_dict(state)
        for loader in loaders:
            samples = loader.next_batch()
            collated = objective.collate(samples, train=True)
            for row, sample in enumerate(samples):
                inputs = collated["input_ids"][row]
                labels = collated["labels"][row]
                seen[sample["epoch"], sample["sample_id"]] = (inputs[inputs != PAD].tolist(),
                                                               labels[labels != -100].tolist())
    return seen


@pytest.mark.parametrize("objective", [
    MaskedLM(ObjectiveConfig(name="mlm"), VOCAB, seed=11),
    SpanCorruption(ObjectiveConfig(name="span_corruption"), VOCAB, seed=11)], ids=["mlm", "span_corruption"])
def test_one_and_two_workers_and_a_resume_draw_the_same_masks(objective):
    # 1 worker x batch 4 and 2 workers x batch 2 consume the same global stream, over 2.5 epochs.
    one = drawn(objective, world_size=1, batch=4, steps=38)
    two = drawn(objective, world_size=2, batch=2, steps=38)
    resumed = drawn(objective, world_size=2, batch=2, steps=38, resume_at=17)
    assert len(one) == 38 * 4 and one == two == resumed
    # And the draws are real: a sample's mask changes between epochs.
    changed = sum(one[0, i] != one[1, i] for i in range(60))
    assert changed > 50, changed
    assert torch.is_tensor(objective.collate([BlockStore()[0] | {"sample_id": 0, "epoch": 0}], True)["input_ids"])
