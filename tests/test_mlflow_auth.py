"""The shared tracking server of cluster/mlflow-server.sh, for real: basic auth, a SQLite store and artifacts in
S3 (moto's S3 server on 127.0.0.1). `lmforge train` with a wrong password stops before training with one
clear line; with an account of the server the run is logged, its artifacts in the bucket."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_helpers import free_port, wait_serving

from orchestrator.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "cluster" / "mlflow-server.sh"
BUCKET = "lmforge-mlflow"
ADMIN_PASSWORD = "admin-password-0123"
TRAINER, TRAINER_PASSWORD = "trainer", "trainer-password-4567"
WRONG_PASSWORD = "not-the-password-89"
# Fake `mlflow` for the refusal cases: records that it was called instead of starting a server.
FAKE_MLFLOW = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$RECORD"
"""


def script_env(tmp_path: Path, **env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LMFORGE_MLFLOW_"))}
    return base | {"LMFORGE_MLFLOW_STATE": str(tmp_path / "state")} | env


def run_script(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str] | None]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "mlflow").write_text(FAKE_MLFLOW)
    (bin_dir / "mlflow").chmod(0o755)
    record = tmp_path / "mlflow.args"
    out = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=30, env=script_env(
        tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", RECORD=str(record), **env))
    return out, record.read_text().splitlines() if record.exists() else None


@pytest.mark.parametrize("env,args,named", [
    ({"MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD}, [], "MLFLOW_FLASK_SERVER_SECRET_KEY"),
    ({"MLFLOW_FLASK_SERVER_SECRET_KEY": "k"}, [], "MLFLOW_AUTH_ADMIN_PASSWORD"),
    ({"MLFLOW_FLASK_SERVER_SECRET_KEY": "k", "MLFLOW_AUTH_ADMIN_PASSWORD": "short"}, [], "at least 12"),
    ({"MLFLOW_FLASK_SERVER_SECRET_KEY": "k", "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD}, ["--host", "0.0.0.0"],
     "LMFORGE_MLFLOW_ALLOWED_HOSTS"),
])
def test_server_script_refuses_to_start_without_its_secrets(tmp_path, env, args, named):
    out, called = run_script(tmp_path, *args, **env)
    assert out.returncode != 0 and called is None, "mlflow server must not start"
    assert named in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert ADMIN_PASSWORD not in out.stderr


def test_server_script_serves_basic_auth_on_loopback_with_the_names_clients_use(tmp_path):
    out, called = run_script(tmp_path, "--host", "10.1.2.3", "--port", "5001", MLFLOW_FLASK_SERVER_SECRET_KEY="k",
                             MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD, LMFORGE_MLFLOW_ALLOWED_HOSTS="mlflow.internal",
                             LMFORGE_MLFLOW_DB="postgresql://mlflow:dbsecret@db.internal/mlflow",
                             LMFORGE_MLFLOW_ARTIFACTS="s3://bucket/mlflow")
    assert out.returncode == 0, out.stderr
    option = dict(zip(called, called[1:]))
    assert called[0] == "server" and option["--app-name"] == "basic-auth"
    assert option["--host"] == "10.1.2.3" and option["--port"] == "5001"
    assert option["--backend-store-uri"] == "postgresql://mlflow:dbsecret@db.internal/mlflow"
    assert option["--artifacts-destination"] == "s3://bucket/mlflow"
    assert {"mlflow.internal", "mlflow.internal:*"} <= set(option["--allowed-hosts"].split(","))
    assert "dbsecret" not in out.stderr  # the database password is masked in what the script prints
    ini = (tmp_path / "state" / "basic_auth.ini").read_text()
    assert f"database_uri = sqlite:///{tmp_path}/state/basic_auth.db" in ini and ADMIN_PASSWORD not in ini

    out, called = run_script(tmp_path, MLFLOW_FLASK_SERVER_SECRET_KEY="k", MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD)
    assert dict(zip(called, called[1:]))["--host"] == "127.0.0.1"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """cluster/mlflow-server.sh with a SQLite store and artifacts in S3; a `trainer` account made by the admin.
    The trainer's login is in this process's environment before Ray starts, as for a user who exported it."""
    import boto3
    import ray

    tmp = tmp_path_factory.mktemp("mlflow_auth")
    s3_port, port = free_port(), free_port()
    s3 = subprocess.Popen([sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p",
                           str(s3_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}"}
    bucket = boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    deadline = time.time() + 30
    while True:
        try:
            bucket.create_bucket(Bucket=BUCKET)
            break
        except Exception:
            assert time.time() < deadline and s3.poll() is None, "moto's S3 server did not start"
            time.sleep(0.2)
    env = script_env(tmp, **aws, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                     MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret-key", MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD,
                     LMFORGE_MLFLOW_ARTIFACTS=f"s3://{BUCKET}/mlflow", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log_file = open(tmp / "server.log", "wb")  # noqa: SIM115 - the server keeps writing to it
    proc = subprocess.Popen([str(SCRIPT), "--port", str(port), "--workers", "1"], cwd=tmp, env=env,
                            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        assert wait_serving(uri, proc, 120), (tmp / "server.log").read_text()[-3000:]
        with pytest.MonkeyPatch.context() as mp:
            from mlflow.server import get_app_client

            mp.setenv("MLFLOW_TRACKING_USERNAME", "admin")
            mp.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
            get_app_client("basic-auth", tracking_uri=uri).create_user(TRAINER, TRAINER_PASSWORD)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_USERNAME", TRAINER)
            mp.setenv("MLFLOW_TRACKING_PASSWORD", TRAINER_PASSWORD)
            ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            try:
                yield {"uri": uri, "bucket": bucket, "home": tmp / "home"}
            finally:
                ray.shutdown()
    finally:
        for p in (proc, s3):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        log_file.close()


def train(server, *overrides: str) -> int:
    return main(["train", "experiment=smoke", "trainer.max_steps=10", "tracking=mlflow-server",
                 f"tracking.tracking_uri={server['uri']}",
                 f"paths.root={server['home']}", *overrides])


def admin_runs(uri: str) -> list:
    from mlflow import MlflowClient

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        mp.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
        client = MlflowClient(uri)
        return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_wrong_password_stops_train_before_training_with_one_line(server, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", WRONG_PASSWORD)
    assert train(server, "run_name=wrong-password") != 0
    out, err = capsys.readouterr()
    assert err.startswith("lmforge: error:") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and "401" in err and server["uri"] in err
    assert WRONG_PASSWORD not in out + err and TRAINER_PASSWORD not in out + err
    assert not list(Path(server["home"]).glob("runs/wrong-password/checkpoint_*")), "nothing may be trained"
    assert not admin_runs(server["uri"])


def test_wrong_password_error_says_which_variables_to_set(server, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", WRONG_PASSWORD)
    assert train(server, "run_name=wrong-password-clear") == 2
    err = capsys.readouterr().err
    assert f"MLflow at {server['uri']} refused the credentials for user 'trainer' (HTTP 401)" in err, err
    assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in err


def test_right_credentials_log_the_run_with_artifacts_in_s3(server, capsys):
    from mlflow import MlflowClient

    assert train(server, "run_name=signed-in") == 0, capsys.readouterr().err[-3000:]
    out, err = capsys.readouterr()
    assert TRAINER_PASSWORD not in out + err
    client = MlflowClient(server["uri"])  # signed in as the trainer, from the environment
    [run] = [r for r in admin_runs(server["uri"]) if r.info.run_name == "signed-in"]
    assert run.info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert steps == {5, 10}  # experiment=smoke logs every 5 steps
    assert TRAINER_PASSWORD not in str(run.data.params) + str(run.data.tags)
    # Artifacts went through the server to the bucket: the client never held an S3 credential of its own.
    keys = [o["Key"] for o in server["bucket"].list_objects_v2(Bucket=BUCKET, Prefix="mlflow/")["Contents"]]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/checkpoints.json") for k in keys), keys
