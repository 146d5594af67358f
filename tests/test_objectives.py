"""The causal-LM objective: padding carries no loss, and the loss is the model's next-token loss."""

import numpy as np
import torch

from model.config import ModelConfig
from model.gpt import build_model
from model.objectives import get_objective

clm = get_objective("clm")


def test_packed_blocks_are_their_own_labels():
    blocks = [np.array([5, 6, 7, 8]), np.array([1, 1, 2, 3])]
    batch = clm.collate(blocks, pad_id=1)
    assert torch.equal(batch["labels"], torch.tensor(np.stack(blocks)))
    assert "attention_mask" not in batch, "id 1 is text here even though it is the pad id"


def test_padding_is_masked_by_length_and_does_not_change_the_loss():
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=16, max_seq_len=8), 64, seed=0).eval()
    doc, short = np.array([5, 6, 7, 0, 8, 0]), np.array([5, 6, 0, 0])  # 0 is end-of-text here, not padding
    batch = clm.collate([doc, short], pad_id=None)
    assert batch["input_ids"].shape == (2, 6)
    assert batch["labels"][1].tolist() == [5, 6, 0, 0, -100, -100], "only the positions past the end are padding"
    assert batch["labels"][0].tolist() == doc.tolist()
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]
    with torch.no_grad():
        alone = clm.loss(model, clm.collate([short], pad_id=None))
        padded = model(**{k: v[1:] for k, v in batch.items()}).loss
    assert torch.allclose(alone, padded, atol=1e-6)


def test_padding_fills_with_the_pad_id_when_there_is_one():
    batch = clm.collate([np.array([4, 5, 6]), np.array([4])], pad_id=3)
    assert batch["input_ids"][1].tolist() == [4, 3, 3] and batch["labels"][1].tolist() == [4, -100, -100]


def test_perplexity_is_exp_loss():
    assert abs(clm.metrics(2.0)["perplexity"] - 7.389056) < 1e-5
