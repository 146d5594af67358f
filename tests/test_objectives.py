"""The causal-LM objective: padding carries no loss, the loss is the model's next-token loss, and the
validation sums give the same loss however the samples are batched."""

import numpy as np
import torch

from data.prepared import Vocabulary
from model.build import build_model
from model.config import ModelConfig
from model.objectives import OBJECTIVES, get_objective
from model.objectives.config import ObjectiveConfig


def clm(pad_id=None):
    return get_objective("clm")(ObjectiveConfig(), Vocabulary(64, 0, 0, pad_id), seed=0)


def samples(*arrays):
    return [{"input_ids": a, "sample_id": i, "epoch": 0} for i, a in enumerate(arrays)]


def test_packed_blocks_are_their_own_labels():
    blocks = [np.array([5, 6, 7, 8]), np.array([1, 1, 2, 3])]
    batch = clm(pad_id=1).collate(samples(*blocks), train=True)
    assert torch.equal(batch["labels"], torch.tensor(np.stack(blocks)))
    assert "attention_mask" not in batch, "id 1 is text here even though it is the pad id"


def test_padding_is_masked_by_length_and_does_not_change_the_loss():
    objective = clm()
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=16, max_seq_len=8), 64, seed=0).eval()
    doc, short = np.array([5, 6, 7, 0, 8, 0]), np.array([5, 6, 0, 0])  # 0 is end-of-text here, not padding
    batch = objective.collate(samples(doc, short), train=True)
    assert batch["input_ids"].shape == (2, 6)
    assert batch["labels"][1].tolist() == [5, 6, 0, 0, -100, -100], "only the positions past the end are padding"
    assert batch["labels"][0].tolist() == doc.tolist()
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]
    assert objective.tokens(batch) == (10, 0), "throughput counts real tokens, not padding"
    with torch.no_grad():
        alone = objective.loss(model, objective.collate(samples(short), train=True))
        padded = model(**{k: v[1:] for k, v in batch.items()}).loss
    assert torch.allclose(alone, padded, atol=1e-6)


def test_padding_fills_with_the_pad_id_when_there_is_one():
    batch = clm(pad_id=3).collate(samples(np.array([4, 5, 6]), np.array([4])), train=True)
    assert batch["input_ids"][1].tolist() == [4, 3, 3] and batch["labels"][1].tolist() == [4, -100, -100]


def test_validation_loss_is_per_token_whatever_the_batching():
    """Sums over batches weigh every token once: one batch of three documents gives the same loss as three
    batches of one, and it equals the model's own loss over all of them."""
    objective = clm()
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=16, max_seq_len=8), 64, seed=0).eval()
    docs = samples(np.array([5, 6, 7, 8, 9, 10]), np.array([3, 4]), np.array([7, 7, 8]))
    with torch.no_grad():
        together = objective.eval_sums(model, objective.collate(docs, train=False))
        apart = [objective.eval_sums(model, objective.collate([d], train=False)) for d in docs]
    summed = {k: sum(float(a[k]) for a in apart) for k in together}
    assert summed["tokens"] == float(together["tokens"]) == 5 + 1 + 2
    metrics = objective.metrics({k: float(v) for k, v in together.items()})
    assert abs(metrics["loss"] - objective.metrics(summed)["loss"]) < 1e-6
    assert abs(metrics["perplexity"] - np.exp(metrics["loss"])) < 1e-4
    with torch.no_grad():
        single = objective.loss(model, objective.collate(docs[:1], train=False))
        alone = objective.metrics({k: float(v) for k, v in apart[0].items()})["loss"]
    assert abs(float(single) - alone) < 1e-5


def test_registry_names_every_objective_and_its_head():
    assert set(OBJECTIVES) >= {"clm"}
    assert get_objective("clm").head == "causal_lm" and get_objective("clm").families == ("decoder",)
