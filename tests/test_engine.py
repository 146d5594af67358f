"""The DeepSpeed config is derived from the lmforge config, and the LR schedule has the promised shape."""

import pytest

from orchestrator.config import load_config
from orchestrator.engine import deepspeed_config, lr_at


def test_deepspeed_config_follows_lmforge_config():
    cfg = load_config(["trainer.micro_batch_size=3", "trainer.gradient_accumulation_steps=4",
                       "trainer.grad_clip=0.5", "hardware.zero_stage=3", "hardware.offload_param=cpu",
                       "hardware.offload_optimizer=cpu"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 3 * 4 * 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]


def test_gpu_precision_reaches_deepspeed():
    ds = deepspeed_config(load_config(["hardware=gpu-8"]), world_size=8)
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_lr_warms_up_then_decays_to_min(schedule):
    tr = load_config([f"trainer.lr_schedule={schedule}", "trainer.max_steps=100", "trainer.warmup_steps=10",
                      "trainer.lr=1e-3", "trainer.min_lr=1e-4"]).trainer
    lrs = [lr_at(s, tr) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(1e-4)
    mid = lrs[55]
    assert mid == pytest.approx(5.5e-4, rel=0.01)
