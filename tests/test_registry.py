"""The final model of a run in the MLflow registry, against a real `mlflow server` on 127.0.0.1: real 2-worker
ZeRO-2 runs (a causal LM pretrained by experiment=smoke, a topic classifier fine-tuned by ft-topics) on a
real local Ray cluster, registered with their lineage, loaded back with mlflow.transformers and mlflow.pyfunc.

What users rely on: the version names its run, checkpoint, parent, data and metrics; it loads and
predicts (generated text; a label the classifier was trained on); tracking.register=false keeps the model
in the run only; a broken tracking server costs a warning, never the run.
"""

import json
import logging

import mlflow
import pytest
import ray
from mlflow import MlflowClient
from mlflow_server import MlflowServer
from run_helpers import free_port

from data.prepared import MANIFEST
from orchestrator.checkpoint import read_marker
from orchestrator.config import load_config
from orchestrator.launcher import train
from orchestrator.registry import register_final_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("registry_server"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry_home")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield root
    ray.shutdown()


@pytest.fixture(scope="module")
def client(server):
    mlflow.set_tracking_uri(server.uri)  # models:/ URIs below resolve against the server
    yield MlflowClient(server.uri)
    mlflow.set_tracking_uri(None)


def config(home, server, overrides):
    overrides = overrides + [f"paths.root={home}", f"tracking.tracking_uri={server.uri}"]
    return load_config(overrides), overrides


def trained_and_registered(home, server, client, overrides):
    """(train result, config, model version) of a real run whose final model is in the registry."""
    cfg, overrides = config(home, server, overrides)
    result = train(cfg, overrides)
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"
    versions = client.search_model_versions(f"run_id='{result.mlflow_run_id}'")
    if not versions:  # until launcher.train calls register_final_model itself
        record = register_final_model(cfg, result.mlflow_run_id, result.run_dir, result.checkpoint, result.metrics)
        assert record is not None and record.version is not None
        versions = client.search_model_versions(f"run_id='{result.mlflow_run_id}'")
    assert len(versions) == 1, versions
    # Logging into the run leaves its status alone: the launcher finishes it afterwards.
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"
    return result, cfg, versions[0]


@pytest.fixture(scope="module")
def smoke(home, server, client):
    return trained_and_registered(home, server, client, ["experiment=smoke", "run_name=smoke"])


@pytest.fixture(scope="module")
def topics(home, server, client):
    # ft-topics, shortened: two evaluations, so the best checkpoint is chosen between them.
    return trained_and_registered(home, server, client, [
        "experiment=ft-topics", "run_name=topics", "trainer.max_steps=40", "trainer.eval_every=20",
        "checkpoint.every=20", "trainer.warmup_steps=4"])


def test_a_pretrained_causal_lm_is_registered_with_its_lineage_and_generates(smoke, client):
    result, cfg, version = smoke
    assert version.name == "gpt-tiny-clm"
    tags = version.tags
    assert tags["lmforge.kind"] == "pretraining" and tags["lmforge.objective"] == "clm"
    assert tags["lmforge.run_id"] == result.mlflow_run_id and tags["lmforge.run_dir"] == result.run_dir
    assert tags["lmforge.checkpoint"] == result.checkpoint and tags["lmforge.step"] == "20"
    assert tags["lmforge.parent"].startswith("none")
    prepared = json.loads((cfg_prepared(result) / MANIFEST).read_text())
    assert tags["lmforge.data"] == prepared["key"] and len(tags["lmforge.data_manifest_sha256"]) == 64
    marker = read_marker(result.checkpoint)
    assert float(tags["metric.val/loss"]) == pytest.approx(marker["metrics"]["val/loss"], rel=1e-5)
    assert result.mlflow_run_id in version.description and "val/loss" in version.description
    assert "pretraining" in version.description

    pipeline = mlflow.transformers.load_model(f"models:/{version.name}/{version.version}")
    assert type(pipeline).__name__ == "TextGenerationPipeline"
    prompt = "The function returns"
    [text] = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}").predict(
        [prompt], params={"max_new_tokens": 8})
    assert text.startswith(prompt) and len(text) > len(prompt), text
    run_tags = client.get_run(result.mlflow_run_id).data.tags
    assert run_tags["lmforge.registered_model"].startswith(f"registered gpt-tiny-clm version {version.version}")


def cfg_prepared(result):
    from pathlib import Path

    from orchestrator.runs import read_run_info

    return Path(read_run_info(result.run_dir)["prepared"])


def test_a_fine_tuned_classifier_is_its_best_checkpoint_and_predicts_a_training_label(topics, client):
    result, cfg, version = topics
    assert version.name == "bert-tiny-seq_cls"
    tags = version.tags
    assert tags["lmforge.kind"] == "fine-tuning"
    selection = read_marker(result.checkpoint)["selection"]
    assert tags["lmforge.step"] == str(selection["best_step"])
    assert tags["lmforge.checkpoint_choice"].startswith(f"best by {selection['metric']}")
    assert float(tags[f"metric.{selection['metric']}"]) == pytest.approx(selection["best"], rel=1e-5)

    uri = f"models:/{version.name}/{version.version}"
    assert type(mlflow.transformers.load_model(uri)).__name__ == "TextClassificationPipeline"
    labels = read_marker(result.checkpoint)["labels"]
    predicted = mlflow.pyfunc.load_model(uri).predict(["Return the number of items in a container."])
    assert predicted["label"][0] in labels, (predicted, labels)


def test_register_false_logs_the_model_in_the_run_and_leaves_a_running_run_running(smoke, home, server, client):
    result, _, version = smoke
    cfg, _ = config(home, server, ["experiment=smoke", "tracking.register=false"])
    run_id = result.mlflow_run_id
    before = {v.version for v in client.search_model_versions(f"name='{version.name}'")}
    logged_before = len(client.get_run(run_id).outputs.model_outputs)
    client.update_run(run_id, status="RUNNING")  # as the launcher calls it: before the run is finished
    try:
        record = register_final_model(cfg, run_id, result.run_dir, result.checkpoint, result.metrics)
        assert client.get_run(run_id).info.status == "RUNNING"
    finally:
        client.set_terminated(run_id, "FINISHED")
    assert record.version is None and record.name is None
    assert {v.version for v in client.search_model_versions(f"name='{version.name}'")} == before
    assert len(client.get_run(run_id).outputs.model_outputs) == logged_before + 1
    pipeline = mlflow.transformers.load_model(record.model_uri)
    assert type(pipeline).__name__ == "TextGenerationPipeline"


def test_a_broken_tracking_server_is_a_warning_not_an_error(smoke, home, caplog):
    result, _, _ = smoke
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = load_config([f"paths.root={home}", "experiment=smoke", f"tracking.tracking_uri={dead}",
                       "tracking.request_timeout_s=1"])
    with caplog.at_level(logging.WARNING, logger="lmforge.registry"):
        assert register_final_model(cfg, result.mlflow_run_id, result.run_dir, result.checkpoint, {}) is None
    [warning] = [r for r in caplog.records if r.name == "lmforge.registry"]
    assert "could not log the final model" in warning.getMessage() and dead in warning.getMessage()


def test_backend_none_does_nothing(smoke, home, client):
    result, _, _ = smoke
    cfg = load_config([f"paths.root={home}", "experiment=smoke", "tracking=none"])
    logged_before = len(client.get_run(result.mlflow_run_id).outputs.model_outputs)
    assert register_final_model(cfg, result.mlflow_run_id, result.run_dir, result.checkpoint, {}) is None
    assert len(client.get_run(result.mlflow_run_id).outputs.model_outputs) == logged_before
