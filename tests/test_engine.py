"""The DeepSpeed config is derived from the lmforge config, and the LR schedule has the promised shape."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.config import load_config
from orchestrator.engine import deepspeed_config, lr_at, plain_arch_list, use_own_ninja

ROOT = Path(__file__).resolve().parents[1]


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


def test_deepspeed_adds_no_device_sync_of_its_own_per_step():
    """On a GPU each host-device sync in a step idles the GPU while the host queues the next kernels: without
    these three, DeepSpeed's gpt2-124m step went from 0.82x to 1.2x the plain loop on an H100."""
    one_gpu = deepspeed_config(load_config(["hardware=gpu-1", "hardware.zero_stage=2"]), world_size=1)
    assert one_gpu["timers"]["throughput"]["enabled"] is False, "lmforge meters throughput itself"
    assert one_gpu["bf16"]["check_grad_overflow"] is False, "worker.divergence stands in for it"
    assert one_gpu["zero_optimization"]["overlap_comm"] is False, "nothing to overlap on one GPU"
    fleet = deepspeed_config(load_config(["hardware=gpu-8", "trainer.skip_nonfinite_steps=true"]), world_size=8)
    assert fleet["zero_optimization"]["overlap_comm"] is True
    assert fleet["bf16"]["check_grad_overflow"] is True


def test_optimizer_needs_no_jit_built_op_unless_offloaded():
    gpu = deepspeed_config(load_config(["hardware=gpu-8"]), world_size=8)["optimizer"]["params"]
    assert gpu["torch_adam"] and gpu["fused"], "torch's fused AdamW kernel, not DeepSpeed's nvcc-built FusedAdam"
    cpu = deepspeed_config(load_config([]), world_size=2)["optimizer"]["params"]
    assert cpu["torch_adam"] and "fused" not in cpu
    offloaded = deepspeed_config(load_config(["hardware=gpu-8", "hardware.offload_optimizer=cpu"]), 8)
    assert "torch_adam" not in offloaded["optimizer"]["params"], "offload needs DeepSpeed's CPU Adam"


def test_arch_specific_cuda_targets_become_plain_for_deepspeeds_builder():
    assert plain_arch_list("9.0a") == "9.0"
    assert plain_arch_list("8.0;8.6;9.0a;10.0a+PTX") == "8.0;8.6;9.0;10.0+PTX"
    assert plain_arch_list("7.5 8.0+PTX") == "7.5 8.0+PTX"


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


def run_python(code: str, cwd=None) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), str(cwd or ROOT)])})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_workers_load_deepspeed_without_mlflow_or_inductor():
    # In a fresh process, as a Ray worker starts: what deepspeed.initialize imports is already loaded, and
    # neither MLflow nor Inductor came with it; MLflow still imports normally afterwards.
    out = run_python(
        "import sys\n"
        "from orchestrator.engine import import_deepspeed\n"
        "import_deepspeed()\n"
        "from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam\n"
        "print('mlflow' in sys.modules, 'torch._inductor.compile_fx' in sys.modules)\n"
        "import mlflow\n"
        "print(mlflow.MlflowClient.__name__)\n")
    assert out.split()[-3:] == ["False", "False", "MlflowClient"]  # after DeepSpeed's own banner


def test_deferred_compile_still_compiles_on_first_call(tmp_path):
    (tmp_path / "compiled_at_import.py").write_text(
        "import torch\n\n"
        "@torch.compile(backend='eager')\n"
        "def add_one(x):\n    return x + 1\n\n"
        "def twice(x):\n    return 2 * x\n\n"
        "twice = torch.compile(twice, backend='eager')\n")
    out = run_python(
        "import sys, torch\n"
        "from orchestrator.engine import _import_with_deferred_compile\n"
        "_import_with_deferred_compile('compiled_at_import')\n"
        "import compiled_at_import as m\n"
        "print(torch.compile.__module__, hasattr(m.add_one, '_torchdynamo_orig_callable'))\n"
        "print(m.add_one(torch.ones(2)).tolist(), m.twice(torch.ones(2)).tolist(), m.add_one.__name__, "
        "torch._dynamo.utils.counters['frames']['ok'])\n",
        cwd=tmp_path)
    restored_and_not_compiled_yet, first_calls = out.splitlines()
    assert restored_and_not_compiled_yet == "torch False"
    assert first_calls == "[2.0, 2.0] [2.0, 2.0] add_one 2"  # both went through dynamo


def test_deepspeed_builds_its_ops_with_this_environments_ninja(monkeypatch):
    own = Path(sys.executable).parent / "ninja"
    if not own.exists():
        pytest.skip("no ninja next to this Python")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # as when the venv is not activated
    use_own_ninja()
    use_own_ninja()
    assert shutil.which("ninja") == str(own)
    assert os.environ["PATH"].split(os.pathsep).count(str(own.parent)) == 1


def test_deepspeed_builds_its_ops_inside_this_environment(tmp_path):
    """Not in ~/.cache/torch_extensions, which every virtualenv shares and rebuilds in turn; a user's choice wins."""
    code = ("import os\nfrom orchestrator.quiet import set_verbosity\nset_verbosity(False)\n"
            "print(os.environ['TORCH_EXTENSIONS_DIR'])\n")
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    driver = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                            env=env)
    assert driver.stdout.strip() == str(Path(sys.prefix) / "torch_extensions"), driver.stderr[-2000:]
    chosen = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                            env=env | {"TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert chosen.stdout.strip() == str(tmp_path)


def test_workers_on_any_cluster_build_ops_inside_their_environment(monkeypatch):
    import orchestrator.engine as engine

    calls = []
    fake_deepspeed = type("FakeDeepSpeed", (), {"initialize": staticmethod(lambda **kw: calls.append(kw) or
                                                                          (None, None, None, None))})
    monkeypatch.setattr(engine, "import_deepspeed", lambda: fake_deepspeed)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "unset below, restored after the test")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    engine.build_engine(torch.nn.Linear(2, 2), load_config([]), world_size=1)
    assert calls and os.environ["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "torch_extensions")
