"""The MFU formula counts 6N matmul FLOPs plus attention, against hand-computed numbers; MFU is shown only
against a peak the hardware config names."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from model.config import ModelConfig
from model.flops import flops_per_token, matmul_params, mfu
from model.gpt import build_model, padded_vocab_size
from orchestrator.cli import speed_summary
from orchestrator.config import load_config
from orchestrator.metrics import StepMeter
from orchestrator.progress import postfix

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_gpt2_124m_flops_per_token_matches_hand_count():
    cfg = ModelConfig(name="gpt2-124m", n_layer=12, n_head=12, n_embd=768, max_seq_len=1024)
    n = 124_475_904  # GPT-2 small with a 50304-token vocab, tied head, including 1024x768 positions
    expected = 6 * (n - 1024 * 768) + 12 * 12 * 768 * 1024
    assert flops_per_token(n, cfg, 1024) == expected
    assert flops_per_token(n, cfg, 1024) == 855_383_040  # 742,136,832 dense + 113,246,208 attention


def test_position_table_excluded_only_for_learned_positions():
    gpt = ModelConfig(arch="gpt2", max_seq_len=128, n_embd=64)
    llama = ModelConfig(arch="llama", max_seq_len=128, n_embd=64)
    assert matmul_params(10_000, gpt) == 10_000 - 128 * 64
    assert matmul_params(10_000, llama) == 10_000


def test_mfu_is_achieved_over_peak():
    cfg = ModelConfig(arch="llama", n_layer=2, n_embd=64, max_seq_len=128)
    per_token = flops_per_token(1_000_000, cfg, 128)
    assert mfu(1000.0, 1_000_000, cfg, 128, per_token * 1000.0, 1) == pytest.approx(1.0)
    assert mfu(1000.0, 1_000_000, cfg, 128, per_token * 1000.0, 4) == pytest.approx(0.25)


def test_cpu_hardware_names_no_peak_and_gpu_presets_keep_theirs():
    assert load_config([]).hardware.peak_flops_per_worker is None
    assert load_config(["hardware=cpu"]).hardware.peak_flops_per_worker is None
    for preset in ("gpu-1", "gpu-8"):
        assert load_config([f"hardware={preset}"]).hardware.peak_flops_per_worker == 989.0e12
    assert OmegaConf.load(CONF / "hardware" / "multinode-zero3.yaml").peak_flops_per_worker == 989.0e12
    assert load_config(["hardware.peak_flops_per_worker=2e11"]).hardware.peak_flops_per_worker == 2e11


def window(peak: float | None) -> dict:
    cfg = ModelConfig(arch="llama", n_layer=2, n_embd=64, max_seq_len=128)
    meter = StepMeter(tokens_per_step=1024, num_params=1_000_000, model_cfg=cfg, seq_len=128,
                      peak_flops_per_worker=peak, world_size=2)
    meter.start()
    meter.stop()
    return {f"train/{k}": v for k, v in meter.read().items()}


def test_without_a_peak_no_mfu_is_logged_and_the_console_says_n_a():
    metrics = window(peak=None) | {"train/loss": 4.1}
    assert "train/mfu" not in metrics and metrics["train/tokens_per_second"] > 0
    assert postfix(metrics).endswith("mfu n/a")
    assert speed_summary(metrics).endswith("MFU n/a (last logged window)")


def test_with_a_peak_mfu_is_logged_and_shown():
    metrics = window(peak=1e12)
    assert metrics["train/mfu"] > 0
    assert f"mfu {metrics['train/mfu']:.1%}" in postfix(metrics)
    assert f"MFU {metrics['train/mfu']:.1%} (last" in speed_summary(metrics)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_built_model_is_seeded_and_padded(arch):
    cfg = ModelConfig(arch=arch, n_layer=1, n_head=2, n_embd=32, max_seq_len=16,
                      n_kv_head=1 if arch == "llama" else None)
    a, b = build_model(cfg, 500, seed=3), build_model(cfg, 500, seed=3)
    c = build_model(cfg, 500, seed=4)
    assert a.config.vocab_size == padded_vocab_size(cfg, 500) == 512
    wa, wb, wc = (next(m.parameters()) for m in (a, b, c))
    assert (wa == wb).all() and not (wa == wc).all()
