"""lmforge submit / logs / status / stop / list against a real two-node Ray cluster on 127.0.0.1
(cluster/local-cluster.sh, token authentication on), driven through the `lmforge` command as a user would."""

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def run(*args: str, env: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lmforge"), *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def cluster():
    # A short state path: Ray's Unix sockets live under each node's temp dir (107-byte limit).
    state = tempfile.mkdtemp(prefix="lmc-", dir="/tmp")
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"PATH": f"{BIN}:{env['PATH']}", "RAY_AUTH_TOKEN": token, "LMFORGE_CLUSTER_DIR": state}
    started = subprocess.run([str(REPO / "cluster/local-cluster.sh"), "start", "--workers", "1"],
                             capture_output=True, text=True, env=env, timeout=300)
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        address = started.stdout.strip().rsplit("RAY_ADDRESS=", 1)[1]
        yield {"env": env | {"RAY_ADDRESS": address}, "address": address, "token": token}
    finally:
        subprocess.run([str(REPO / "cluster/local-cluster.sh"), "stop"], env=env, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def job_id(out: str) -> str:
    return next(line.split()[1] for line in out.splitlines() if line.startswith("job:"))


def mlflow_status(root: Path, run_name: str) -> str:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    [found] = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id],
                                 filter_string=f"attributes.run_name = '{run_name}'")
    return found.info.status


def test_submit_follow_status_and_the_stock_ray_cli_agree(cluster, tmp_path):
    root = tmp_path / "runs"
    # Both nodes share this machine's disk, which is what --shared-root asserts.
    out = run("submit", "--shared-root", "experiment=smoke", f"paths.root={root}", "run_name=smoke-job",
              env=cluster["env"])
    assert out.returncode == 0, out.stderr
    job = job_id(out.stdout)
    assert job.startswith("lmforge-smoke-job-")
    assert f"checkpoints: {root}/runs/smoke-job" in out.stdout
    assert cluster["token"] not in out.stdout + out.stderr

    follow = run("logs", job, "--follow", env=cluster["env"])
    assert follow.returncode == 0, follow.stderr[-3000:]
    assert "run:         smoke-job" in follow.stdout  # lmforge train's own summary, streamed from the job

    status = run("status", job, env=cluster["env"])
    assert "status:      SUCCEEDED" in status.stdout
    stock = subprocess.run([str(BIN / "ray"), "job", "status", job], capture_output=True, text=True, timeout=120,
                           env=cluster["env"] | {"RAY_AUTH_MODE": "token"})
    assert "succeeded" in (stock.stdout + stock.stderr).lower()
    assert mlflow_status(root, "smoke-job") == "FINISHED"
    assert (root / "runs/smoke-job/checkpoint_00000020/lmforge_checkpoint.json").is_file()

    listed = run("list", env=cluster["env"])
    assert any(job in line and "SUCCEEDED" in line and "smoke-job" in line for line in listed.stdout.splitlines())


def test_a_sweep_runs_as_a_job_on_the_cluster(cluster, tmp_path):
    root = tmp_path / "runs"
    out = run("submit", "--sweep", "--shared-root", "--wait", "experiment=smoke", "trainer.max_steps=4",
              "trainer.eval_every=2", "checkpoint.every=2", "trainer.log_every=2", "hardware.workers=1",
              "trainer.lr=choice(3e-3,1e-3)", "sweep.search=grid", "sweep.num_samples=1",
              "sweep.max_concurrent_trials=1", "sweep.scheduler=none", f"paths.root={root}", "run_name=job-sweep",
              env=cluster["env"], timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"results:     {root}/sweeps/job-sweep" in out.stdout
    assert "rerun best:  lmforge train" in out.stdout  # the sweep's own summary, streamed from the job
    table = (root / "sweeps/job-sweep/trials.csv").read_text().splitlines()
    assert len(table) == 3, table  # a header and both trials, run by the driver on the cluster


def test_stop_ends_a_running_job(cluster, tmp_path):
    root = tmp_path / "runs"
    out = run("submit", "--shared-root", "experiment=smoke", "trainer.max_steps=100000", f"paths.root={root}",
              "run_name=stopped-job", env=cluster["env"])
    assert out.returncode == 0, out.stderr
    job = job_id(out.stdout)
    deadline = time.monotonic() + 240
    while "step/s" not in run("logs", job, env=cluster["env"]).stdout:  # training has started
        assert time.monotonic() < deadline, run("status", job, env=cluster["env"]).stdout
        time.sleep(3)
    stopped = run("stop", job, env=cluster["env"])
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "status:      STOPPED" in run("status", job, env=cluster["env"]).stdout
    assert run("logs", job, env=cluster["env"]).returncode != 0  # logs exits 0 only for SUCCEEDED
    # The driver takes Ray's SIGTERM as Ctrl-C and closes the run KILLED; give it a moment to get there.
    deadline = time.monotonic() + 60
    while (status := mlflow_status(root, "stopped-job")) == "RUNNING" and time.monotonic() < deadline:
        time.sleep(2)
    assert status == "KILLED"


@pytest.mark.parametrize("token", ["wrong", None])
def test_a_wrong_or_missing_token_is_refused_in_one_line(cluster, tmp_path, token):
    env = {k: v for k, v in cluster["env"].items() if k != "RAY_AUTH_TOKEN"}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    if token:
        env["RAY_AUTH_TOKEN"] = token
    out = run("list", env=env, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert ("rejected the token from RAY_AUTH_TOKEN" if token else "requires a token and none was found") in out.stderr


def test_a_multi_node_run_with_a_local_sqlite_store_is_refused(cluster, tmp_path):
    out = run("submit", "experiment=smoke", f"paths.root={tmp_path}", env=cluster["env"], timeout=120)
    assert out.returncode == 2
    assert "several nodes" in out.stderr and "tracking.tracking_uri=http(s)://" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_a_run_the_cluster_cannot_fit_is_refused_with_what_it_has(cluster, tmp_path):
    out = run("submit", "--shared-root", "experiment=smoke", "hardware.workers=8", f"paths.root={tmp_path}",
              env=cluster["env"], timeout=120)
    assert out.returncode == 2
    assert "it has 2 CPUs and 0 GPUs on 2 node(s)" in out.stderr and "8 worker(s) x 1 CPU" in out.stderr, out.stderr


def test_an_unreachable_address_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(tmp_path)}
    out = run("list", "--address", "http://127.0.0.1:9", env=env, timeout=120)
    assert out.returncode == 2
    assert "cannot reach the Ray cluster at http://127.0.0.1:9" in out.stderr and "Traceback" not in out.stderr
