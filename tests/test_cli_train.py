"""`lmforge train experiment=smoke` as a user runs it: quiet console, a clear summary, then export works."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from run_helpers import losses, run_status

from orchestrator.runs import read_run_info

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def lmforge(*args, env_home: Path, timeout=600):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "LMFORGE_"))}
    env["LMFORGE_HOME"] = str(env_home)
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


def test_smoke_train_then_export_and_generate(tmp_path):
    home = tmp_path / "home"
    out = lmforge("train", "experiment=smoke", env_home=home)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "checkpoints:" in out.stdout and "mlflow run:" in out.stdout
    # `lmforge ui`, not a bare `mlflow ui` that is only on PATH inside the virtualenv.
    assert re.search(rf"^browse:\s+lmforge ui paths.root={re.escape(str(home.resolve()))}$", out.stdout, re.M), out.stdout
    # The CPU preset names no peak FLOP/s, so there is no MFU to show rather than a made-up one.
    assert re.search(r"^speed: .* tokens/s, .* s/step, MFU n/a ", out.stdout, re.M), out.stdout
    # Quiet by default: no library log lines, warnings or tracebacks reach the user.
    noise = [line for line in out.stderr.splitlines()
             if re.search(r"\b(INFO|WARNING|Warning|Traceback)\b|\(RayTrainWorker|\(raylet\)", line)]
    assert not noise, "\n".join(noise[:20])
    run_dir = re.search(r"^checkpoints:\s+(\S+)", out.stdout, re.M).group(1)
    assert Path(run_dir).is_relative_to(home)

    exported = lmforge("export", run_dir, "--out", str(tmp_path / "hf"), env_home=home)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (tmp_path / "hf" / "model.safetensors").is_file()

    sample = lmforge("generate", run_dir, "The for statement", "--max-new-tokens", "8", env_home=home)
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert sample.stdout.startswith("The for statement")


def test_resume_of_unknown_target_is_a_clear_error(tmp_path):
    out = lmforge("train", "experiment=smoke", f"resume={tmp_path}/nope", env_home=tmp_path / "home", timeout=120)
    assert out.returncode == 2
    assert "nope" in out.stderr and "Traceback" not in out.stderr


def test_diverged_run_stops_at_once_with_a_clear_error_and_no_poisoned_checkpoint(tmp_path):
    """lr=1e30: step 1 is computed from sane weights and saved, then its update blows them up."""
    home = tmp_path / "home"
    out = lmforge("train", "experiment=smoke", "trainer.lr=1e30", "checkpoint.every=1", env_home=home)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    message = out.stderr.strip().splitlines()[-1]
    assert re.search(r"train/loss=nan.* by step 2: training diverged", message), message
    assert "checkpoint_00000001" in message and "trainer.lr" in message, message
    assert "restarted" not in out.stderr, "a divergence is not a worker failure: no retries"
    checkpoints = list(home.rglob("checkpoint_0*"))
    assert [p.name for p in checkpoints] == ["checkpoint_00000001"]
    run_id = read_run_info(str(checkpoints[0].parent))["mlflow_run_id"]
    assert math.isnan(losses(home, run_id)[2]), "the diverged step's metrics reach MLflow"
    assert run_status(home, run_id) == "FAILED"


DASHBOARD_PROBE = """
import psutil, ray
from orchestrator.config import load_config
from orchestrator.launcher import connect
cfg = load_config(["hardware.ray_dashboard=true", "paths.root=" + {root!r}])
connect(None, cfg, {{}})
port = int(ray._private.worker.global_worker.node.address_info["webui_url"].rsplit(":", 1)[1])
print(sorted({{c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}}))
ray.shutdown()
"""


def test_embedded_cluster_dashboard_listens_on_loopback_only(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "LMFORGE_"))}
    probe = DASHBOARD_PROBE.format(root=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "['127.0.0.1']"
