"""The causal-LM objective: padding carries no loss, and the loss is the model's next-token loss."""

import torch
from model_helpers import StubTokenizer

from model.config import ModelConfig
from model.gpt import build_model
from model.objectives import get_objective

clm = get_objective("clm")



def test_packed_blocks_are_their_own_labels():
    blocks = torch.tensor([[5, 6, 7, 8]])
    batch = clm.collate(blocks, pad_id=1)
    assert torch.equal(batch["labels"], blocks) and "attention_mask" not in batch


def test_padding_is_masked_and_does_not_change_the_loss():
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=16, max_seq_len=8), StubTokenizer(64), seed=0).eval()
    doc = torch.tensor([[5, 6, 7, 8]])
    padded = torch.tensor([[5, 6, 7, 8, 1, 1]])
    batch = clm.collate(padded, pad_id=1)
    assert batch["labels"][0, 4:].eq(-100).all() and batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0]
    with torch.no_grad():
        assert torch.allclose(clm.loss(model, batch), clm.loss(model, clm.collate(doc, pad_id=1)), atol=1e-6)


def test_perplexity_is_exp_loss():
    assert abs(clm.metrics(2.0)["perplexity"] - 7.389056) < 1e-5
