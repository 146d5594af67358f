"""Resuming and failing to start, as a user does it from a shell: `lmforge train resume=...` and `--address`.

One finished smoke run is shared: resuming it when it has already reached max_steps, resuming it against a
cluster that does not answer (its MLflow run must stay FINISHED), and resuming it by a relative path with
another paths.root (it must continue in its own run directory).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from run_helpers import free_port, run_status

from orchestrator.checkpoint import list_checkpoints
from orchestrator.config import load_config
from orchestrator.runs import read_run_info
from orchestrator.tracking import tracking_uri

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

# A Ray client gives up on an address that does not answer after about 35 s by default; a test need not wait.
FAST_CLIENT_TIMEOUT = {"RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S": "1", "RAY_CLIENT_MAX_CONNECTION_TIMEOUT_S": "1"}


def lmforge(*args, home: Path, cwd: Path = REPO, extra_env: dict | None = None, timeout=600):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "LMFORGE_"))}
    env |= {"LMFORGE_HOME": str(home), "PYTHONPATH": str(REPO)} | (extra_env or {})
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)



@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    home = tmp_path_factory.mktemp("resume_cli")
    out = lmforge("train", "experiment=smoke", "trainer.max_steps=6", "checkpoint.every=3", "run_name=done",
                  home=home)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = home / "runs" / "done"
    return home, run_dir, read_run_info(str(run_dir))["mlflow_run_id"]


def test_resume_of_a_run_that_reached_max_steps_says_so_without_starting_ray(finished):
    home, run_dir, run_id = finished
    out = lmforge("train", f"resume={run_dir}", home=home, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "reached step 6 of trainer.max_steps=6 already" in out.stdout, out.stdout
    assert "first step:" not in out.stdout, "nothing was started"
    assert run_status(home, run_id) == "FINISHED"


def test_unreachable_cluster_is_one_line_and_leaves_the_mlflow_run_as_it_was(finished):
    home, run_dir, run_id = finished
    address = f"ray://127.0.0.1:{free_port()}"
    out = lmforge("train", "--address", address, f"resume={run_dir}", "trainer.max_steps=8", home=home,
                  extra_env=FAST_CLIENT_TIMEOUT, timeout=300)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("lmforge: error:")]
    assert len(errors) == 1 and address in errors[0] and "cannot reach the Ray cluster" in errors[0], out.stderr
    assert run_status(home, run_id) == "FINISHED", "a resume that never trained must not mark the run FAILED"

    fresh = lmforge("train", "--address", address, "experiment=smoke", "run_name=never", home=home,
                    extra_env=FAST_CLIENT_TIMEOUT, timeout=300)
    assert fresh.returncode == 2 and "Traceback" not in fresh.stderr
    client = MlflowClient(tracking_uri(load_config([f"paths.root={home}"]).tracking, str(home)))
    never = [r for r in client.search_runs(client.get_experiment_by_name("lmforge").experiment_id)
             if r.info.run_name == "never"]
    assert [r.info.status for r in never] == ["FAILED"], "a run whose start failed is never left RUNNING"


def test_relative_resume_path_continues_in_the_run_own_directory(finished, tmp_path):
    """From another working directory and another LMFORGE_HOME: the relative path is the user's, and the
    run continues in its own directory and its own MLflow run."""
    home, run_dir, run_id = finished
    relative = os.path.relpath(run_dir, home)
    out = lmforge("train", f"resume={relative}", "trainer.max_steps=8", home=tmp_path / "elsewhere", cwd=home)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(rf"^checkpoints:\s+{re.escape(str(run_dir))}$", out.stdout, re.M), out.stdout
    assert [step for step, _ in list_checkpoints(str(run_dir))] == [6, 8]
    assert f"mlflow run:  {run_id}" in out.stdout
    assert not (tmp_path / "elsewhere" / "runs").exists()


def test_a_data_error_on_a_worker_ends_the_run_at_once_without_retries(tmp_path):
    """A batch larger than the corpus is a user mistake that only a worker sees: with max_failures=3 the
    workers start once, and the user gets the message, not a traceback."""
    trace = tmp_path / "trace"
    out = lmforge("train", "experiment=smoke", "trainer.micro_batch_size=100000", "trainer.max_failures=3",
                  home=tmp_path / "home", extra_env={"LMFORGE_TRACE_SAMPLES": str(trace)})
    assert out.returncode == 2
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert re.search(r"lmforge: error: training failed: \d+ samples cannot fill one global batch", out.stderr), \
        out.stderr[-2000:]
    assert sorted((trace / "starts.txt").read_text().split()) == ["0", "1"], "the worker group started again"
