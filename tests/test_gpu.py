"""The GPU path on one CUDA device: Ray Train with NCCL, DeepSpeed ZeRO 1-3 in bf16, optimizer offload.

Skipped where torch sees no GPU (CI has none). On a GPU machine: `pytest -m gpu`. Tracking is off, so these
tests need no MLflow; the run's own final metrics and checkpoints carry what they check.
"""

import math

import pytest
import ray
import torch
from model_helpers import exported_val_loss

from orchestrator.checkpoint import is_complete, read_marker
from orchestrator.config import load_config
from orchestrator.launcher import train

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

RUN = ["experiment=smoke", "hardware=gpu-1", "hardware.cpus_per_worker=1", "tracking=none",
       "trainer.micro_batch_size=16", "trainer.max_steps=60", "checkpoint.every=60", "trainer.eval_every=60"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield tmp_path_factory.mktemp("gpu_home")
    ray.shutdown()


# ZeRO-2 with the optimizer offloaded to the CPU runs DeepSpeed's CPU Adam, an op it JIT-builds on first use.
@pytest.mark.parametrize(("stage", "offload"), [(1, "none"), (2, "cpu"), (3, "none")])
def test_bf16_zero_stage_trains_on_gpu_and_exports(home, tmp_path, stage, offload):
    overrides = RUN + [f"hardware.zero_stage={stage}", f"hardware.offload_optimizer={offload}",
                       f"run_name=gpu-zero{stage}", f"paths.root={home}"]
    cfg = load_config(overrides)
    result = train(cfg, overrides)
    uniform = math.log(cfg.data.tokenizer.vocab_size)  # the loss of an untrained model
    assert result.metrics["train/loss"] < uniform - 1.0, result.metrics
    assert result.metrics["val/loss"] < uniform - 1.0, result.metrics
    assert 0 < result.metrics["train/mfu"] < 1
    assert is_complete(result.checkpoint)
    assert read_marker(result.checkpoint)["config"]["hardware"]["precision"] == "bf16"
    # Training evaluated in bf16 on the GPU; the export is fp32 on the CPU, so only rounding may differ.
    assert exported_val_loss(home, result, tmp_path) == pytest.approx(result.metrics["val/loss"], abs=0.05)
