"""MLflow tracking against real stores: one run per job, resume, secrets, and a server that dies mid-run."""

import json
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from run_helpers import free_port

from common.errors import LmforgeError
from orchestrator.redact import REDACTED, is_secret_key, redact_value
from orchestrator.schema import TrackingConfig
from orchestrator.tracker import RunTracker
from orchestrator.tracking import finish_run, start_run, tracking_uri

HTTP_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT")


@pytest.fixture(autouse=True)
def restore_http_env(monkeypatch):
    # The tracker sets these process-wide; setenv-then-delenv makes monkeypatch remove them again afterwards.
    for name in HTTP_ENV:
        monkeypatch.setenv(name, "0")
        monkeypatch.delenv(name)


@pytest.fixture
def root(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # so a stray ./mlruns or ./mlflow.db would show up here
    return str(tmp_path / "root")



def metric_steps(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def checkpoints(client, run_id, tmp_path):
    return json.loads(Path(client.download_artifacts(run_id, "checkpoints.json", str(tmp_path))).read_text())


def test_local_store_keeps_metrics_and_checkpoints_under_root(root, tmp_path):
    cfg = TrackingConfig()
    run_id = start_run(cfg, root, "smoke", {"trainer": {"lr": 0.003, "max_steps": 5}}, {"lmforge.model": "tiny"})
    tracker = RunTracker(cfg, root, run_id)
    for step in range(1, 6):
        tracker.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.003}, step)
    tracker.log_checkpoint(5, "file:///ckpts/step_5", 1234, {"val/loss": 0.5})
    assert tracker.flush(30)
    tracker.close()
    assert finish_run(cfg, root, run_id, "FINISHED")

    client = MlflowClient(tracking_uri(cfg, root))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"trainer.lr": "0.003", "trainer.max_steps": "5"}
    assert run.data.tags["lmforge.model"] == "tiny"
    assert metric_steps(client, run_id, "train/loss") == [(s, 1.0 / s) for s in range(1, 6)]
    assert metric_steps(client, run_id, "checkpoint/step") == [(5, 5.0)]
    [record] = checkpoints(client, run_id, tmp_path)
    assert (record["step"], record["uri"], record["size_bytes"], record["metrics"]) == (
        5, "file:///ckpts/step_5", 1234, {"val/loss": 0.5})
    assert run.data.tags["lmforge.checkpoint.latest_uri"] == "file:///ckpts/step_5"
    assert run.info.artifact_uri.startswith((Path(root).resolve() / "mlartifacts").as_uri())
    assert sorted(p.name for p in Path(root).iterdir()) == ["mlartifacts", "mlflow.db"]
    assert list(Path.cwd().iterdir()) == []


def test_resume_reopens_the_same_run(root, tmp_path):
    cfg = TrackingConfig()
    params = {"trainer": {"max_steps": 6}}
    run_id = start_run(cfg, root, "job", params, {})
    with RunTracker(cfg, root, run_id) as tracker:
        for step in range(1, 4):
            tracker.log_metrics({"train/loss": float(step)}, step)
        tracker.log_checkpoint(3, "/ckpts/step_3", 10, {})
    finish_run(cfg, root, run_id, "FAILED")

    params["trainer"]["max_steps"] = 9  # a resumed job may train longer
    assert start_run(cfg, root, "job", params, {}, run_id=run_id) == run_id
    client = MlflowClient(tracking_uri(cfg, root))
    assert client.get_run(run_id).info.status == "RUNNING"
    with RunTracker(cfg, root, run_id) as tracker:  # a fresh tracker, as after a worker restart
        for step in range(4, 7):
            tracker.log_metrics({"train/loss": float(step)}, step)
        tracker.log_checkpoint(6, "/ckpts/step_6", 20, {})
    finish_run(cfg, root, run_id, "FINISHED")

    run = client.get_run(run_id)
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run_id]
    assert metric_steps(client, run_id, "train/loss") == [(s, float(s)) for s in range(1, 7)]
    assert [c["step"] for c in checkpoints(client, run_id, tmp_path)] == [3, 6]
    assert run.data.params["trainer.max_steps"] == "6"  # MLflow params are immutable...
    assert run.data.tags["lmforge.resumed.trainer.max_steps"] == "9"  # ...so the change is a tag


def test_resume_of_unknown_run_is_a_user_error(root):
    with pytest.raises(LmforgeError, match="no such MLflow run"):
        start_run(TrackingConfig(), root, "job", {}, {}, run_id="0" * 32)


def test_secrets_never_reach_mlflow(root):
    cfg = TrackingConfig()
    params = {
        "tracking": {"api_token": "tok-123", "tracking_uri": "https://bob:hunter2@mlflow.example.com"},
        "data": {"paths": ["s3://AKID:s3cr3t@bucket.example.com/x"], "text_field": "text",
                 "tokenizer": {"eos_token": "<|endoftext|>"}},
        "hardware": {"zero_stage": 2},
        "runtime_env": {"env_vars": {"HF_TOKEN": "hf_" + "a" * 34, "AWS_SECRET_ACCESS_KEY": "abc",
                                     "WANDB_API_KEY": "def", "PATH": "/usr/bin"}},
        "storage": "https://store.example.com/ckpt?sv=1&sig=SIGNATURE",
    }
    run_id = start_run(cfg, root, "job", params, {"source": "https://u:pw@git.example.com/repo"})
    run = MlflowClient(tracking_uri(cfg, root)).get_run(run_id)
    stored = run.data.params
    assert stored["tracking.api_token"] == REDACTED
    assert stored["runtime_env.env_vars.HF_TOKEN"] == REDACTED
    assert stored["runtime_env.env_vars.AWS_SECRET_ACCESS_KEY"] == REDACTED
    assert stored["runtime_env.env_vars.WANDB_API_KEY"] == REDACTED
    assert stored["tracking.tracking_uri"] == f"https://{REDACTED}@mlflow.example.com"
    assert stored["data.paths"] == f'["s3://{REDACTED}@bucket.example.com/x"]'
    assert stored["storage"] == f"https://store.example.com/ckpt?sv=1&sig={REDACTED}"
    # Look-alikes that are configuration, not credentials, stay readable.
    assert stored["hardware.zero_stage"] == "2"
    assert stored["data.text_field"] == "text"
    assert stored["data.tokenizer.eos_token"] == "<|endoftext|>"
    assert stored["runtime_env.env_vars.PATH"] == "/usr/bin"
    everything = json.dumps([stored, run.data.tags])
    for secret in ("tok-123", "hunter2", "s3cr3t", "AKID", "hf_aaaa", "SIGNATURE", "abc\"", "def\"", ":pw@"):
        assert secret not in everything


@pytest.mark.parametrize(("key", "secret"), [
    ("api_key", True), ("db.password", True), ("x.secretKey", True), ("x.AWS_ACCESS_KEY_ID", True),
    ("x.key", True), ("data.text_key", False), ("checkpoint.keep_last", False), ("trainer.max_tokens", False),
    ("model.pad_token_id", False), ("x.monkey", False),
])
def test_secret_keys_match_whole_words(key, secret):
    assert is_secret_key(key) is secret


def test_redact_value_keeps_host_and_path():
    assert redact_value("postgresql://u:p@db:5432/mlflow") == f"postgresql://{REDACTED}@db:5432/mlflow"
    assert redact_value("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_backend_none_is_a_no_op(root):
    cfg = TrackingConfig(backend="none")
    assert start_run(cfg, root, "job", {"a": 1}, {}) is None
    tracker = RunTracker(cfg, root, None)
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.log_checkpoint(1, "/x", 1, {})
    assert tracker.flush(1)
    tracker.close()
    assert finish_run(cfg, root, None, "FINISHED")
    assert not Path(root).exists()


def test_unreachable_server_at_start_fails_fast_naming_the_uri(root):
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(LmforgeError, match=uri.replace(".", r"\.")):
        start_run(TrackingConfig(tracking_uri=uri, request_timeout_s=2), root, "job", {}, {})
    assert time.monotonic() - started < 15


def test_queue_is_bounded_and_drops_oldest(root):
    cfg = TrackingConfig(tracking_uri=f"http://127.0.0.1:{free_port()}", request_timeout_s=1, max_queued_metrics=10)
    tracker = RunTracker(cfg, root, "0" * 32)
    started = time.monotonic()
    for step in range(25):
        tracker.log_metrics({"loss": float(step)}, step)
    assert time.monotonic() - started < 2
    assert not tracker.flush(0.5)
    assert (tracker.dropped, tracker.pending) == (15, 10)
    tracker.close(timeout_s=0.1)


def test_server_outage_loses_nothing(root, tmp_path, mlflow_server):
    mlflow_server.start()
    cfg = TrackingConfig(tracking_uri=mlflow_server.uri, request_timeout_s=2)
    run_id = start_run(cfg, root, "job", {"trainer": {"lr": 0.1}}, {})
    tracker = RunTracker(cfg, root, run_id)
    for step in range(5):
        tracker.log_metrics({"train/loss": float(step)}, step)
    assert tracker.flush(20)

    mlflow_server.kill()
    for step in range(5, 15):
        started = time.monotonic()
        tracker.log_metrics({"train/loss": float(step)}, step)
        if step == 10:
            tracker.log_checkpoint(10, "s3://bucket/ckpt/step_10", 99, {"val/loss": 1.5})
        assert time.monotonic() - started < 2, "a log call waited on the dead server"
        time.sleep(0.2)
    assert not tracker.flush(1)
    assert tracker.pending >= 10
    assert finish_run(cfg, root, run_id, "FINISHED") is False  # warns, never raises

    mlflow_server.start()
    assert tracker.flush(30)
    tracker.close()
    assert finish_run(cfg, root, run_id, "FINISHED")

    client = MlflowClient(mlflow_server.uri)
    assert metric_steps(client, run_id, "train/loss") == [(s, float(s)) for s in range(15)]
    [record] = checkpoints(client, run_id, tmp_path)
    assert (record["step"], record["uri"], record["size_bytes"]) == (10, "s3://bucket/ckpt/step_10", 99)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert tracker.dropped == 0
