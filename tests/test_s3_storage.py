"""Checkpoints in S3: `checkpoint.storage=s3://...` against a real S3 API on 127.0.0.1 (moto's server).

The run's storage is then only reachable through S3 (Ray Train uploads each rank's shards, lmforge reads
markers and lists checkpoints with s3fs), so this is the path a cluster without a shared filesystem takes.
A crash between the shards and the completion marker makes Ray Train restart the workers, which must pick
the previous complete checkpoint from S3 and reproduce an uninterrupted run's losses exactly.
"""

import os
import subprocess
import sys
import time

import fsspec
import pytest
import ray
from model_helpers import exported_val_loss
from run_helpers import assert_same_losses, free_port, losses, restored_steps

from orchestrator.checkpoint import FAULT_ENV, TORN_UPLOAD_ENV, list_checkpoints, read_marker
from orchestrator.config import load_config
from orchestrator.launcher import train

pytestmark = pytest.mark.slow

BUCKET = "lmforge-test"
RUN = ["experiment=smoke", "trainer.max_steps=16", "trainer.gradient_accumulation_steps=2", "trainer.log_every=1",
       "checkpoint.every=8", "trainer.eval_every=8"]



@pytest.fixture(scope="module")
def home(tmp_path_factory):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Set before Ray starts, so the embedded cluster's workers inherit them.
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deadline = time.time() + 30
    while True:
        try:
            fsspec.filesystem("s3", skip_instance_cache=True).mkdir(BUCKET)
            break
        except Exception:
            assert time.time() < deadline and server.poll() is None, "moto's S3 server did not start"
            time.sleep(0.2)
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield tmp_path_factory.mktemp("s3_home")
    ray.shutdown()
    server.terminate()
    server.wait(timeout=10)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run(home, overrides, worker_env=None):
    overrides = overrides + [f"paths.root={home}"]
    return train(load_config(overrides), overrides, worker_env=worker_env)


@pytest.fixture(scope="module")
def baseline(home):
    return run(home, RUN + ["run_name=local"])


def test_rank_killed_mid_upload_to_s3_never_leaves_a_checkpoint_resume_selects(home, baseline, tmp_path):
    """The last rank puts half of a shard into S3 under its real name and dies: no marker is ever written for
    step 16, and the restarted workers resume step 8 from S3 with the uninterrupted losses."""
    fault = {TORN_UPLOAD_ENV: f"16:{tmp_path}/torn-once"}
    result = run(home, RUN + ["run_name=torn-in-s3", f"checkpoint.storage=s3://{BUCKET}/runs"], worker_env=fault)
    assert (tmp_path / "torn-once").exists(), "the fault never fired"
    assert restored_steps(home, result.mlflow_run_id) == [8]
    assert [step for step, _ in list_checkpoints(result.run_dir, checksums=True)] == [8, 16]
    assert_same_losses(home, baseline.mlflow_run_id, result.mlflow_run_id, range(1, 17))


def test_run_in_s3_survives_a_crash_mid_save_with_identical_losses(home, baseline, tmp_path):
    fault = {FAULT_ENV: f"16:{tmp_path}/crashed-once"}  # rank 0 dies after the shards, before the marker
    result = run(home, RUN + ["run_name=in-s3", f"checkpoint.storage=s3://{BUCKET}/runs"], worker_env=fault)

    assert result.run_dir == f"s3://{BUCKET}/runs/in-s3"
    assert restored_steps(home, result.mlflow_run_id) == [8], "the restart must resume step 8 from S3"
    assert sorted(losses(home, result.mlflow_run_id)) == list(range(1, 17))
    assert_same_losses(home, baseline.mlflow_run_id, result.mlflow_run_id, range(1, 17))

    assert [step for step, _ in list_checkpoints(result.run_dir)] == [8, 16]
    s3 = fsspec.filesystem("s3", skip_instance_cache=True)
    for _, uri in list_checkpoints(result.run_dir):
        stored = {path.rsplit("/", 1)[-1] for path in s3.find(uri)}
        assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                "rng_rank0.pt", "rng_rank1.pt", "lmforge_checkpoint.json"} <= stored, stored
        assert read_marker(uri)["world_size"] == 2
    assert exported_val_loss(home, result, tmp_path) == pytest.approx(result.metrics["val/loss"], abs=1e-4)
