"""The final model of a run in the MLflow registry, against a real `mlflow server` on 127.0.0.1: real 2-worker
ZeRO-2 runs (a causal LM pretrained by experiment=smoke, a topic classifier fine-tuned by ft-topics) on a
real local Ray cluster, registered with their lineage, loaded back with mlflow.transformers and mlflow.pyfunc.

What users rely on: the version names its run, checkpoint, parent, data and metrics; it loads and
predicts (generated text; a label the classifier was trained on); tracking.register=false keeps the model
in the run only; a broken tracking server costs a warning, never the run.
"""

import json
import logging
from pathlib import Path

import mlflow
import pytest
import ray
from mlflow import MlflowClient
from mlflow_server import MlflowServer
from run_helpers import free_port

from data.prepared import MANIFEST
from orchestrator.checkpoint import read_marker
from orchestrator.config import load_config
from orchestrator.export import EXPORT_INFO, export
from orchestrator.launcher import train
from orchestrator.registry import at_store, lineage_description, lineage_tags, log_model, register_final_model
from orchestrator.tracking import start_run, tracking_uri


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
def experiment_id(client):
    """An experiment for models logged by hand, without training a run first."""
    return client.create_experiment("registry-forms")


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
        "experiment=ft-topics", "run_name=topics", "trainer.max_steps=20", "trainer.eval_every=10",
        "checkpoint.every=10", "trainer.warmup_steps=2"])


@pytest.mark.slow  # trains a real run first (shared by the module)
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
    from orchestrator.runs import read_run_info

    return Path(read_run_info(result.run_dir)["prepared"])


@pytest.mark.slow  # trains a real run first (shared by the module)
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


@pytest.mark.slow  # trains a real run first (shared by the module)
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


@pytest.mark.slow  # trains a real run first (shared by the module)
def test_a_broken_tracking_server_is_a_warning_not_an_error(smoke, home, caplog):
    result, _, _ = smoke
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = load_config([f"paths.root={home}", "experiment=smoke", f"tracking.tracking_uri={dead}",
                       "tracking.request_timeout_s=1"])
    with caplog.at_level(logging.WARNING, logger="lmforge.registry"):
        assert register_final_model(cfg, result.mlflow_run_id, result.run_dir, result.checkpoint, {}) is None
    [warning] = [r for r in caplog.records if r.name == "lmforge.registry"]
    assert "could not log the final model" in warning.getMessage() and dead in warning.getMessage()


@pytest.mark.slow  # trains a real run first (shared by the module)
def test_backend_none_does_nothing(smoke, home, client):
    result, _, _ = smoke
    cfg = load_config([f"paths.root={home}", "experiment=smoke", "tracking=none"])
    logged_before = len(client.get_run(result.mlflow_run_id).outputs.model_outputs)
    assert register_final_model(cfg, result.mlflow_run_id, result.run_dir, result.checkpoint, {}) is None
    assert len(client.get_run(result.mlflow_run_id).outputs.model_outputs) == logged_before


@pytest.mark.slow  # trains a real run first (shared by the module)
def test_the_default_local_store_registers_and_writes_nothing_into_the_working_directory(smoke, tmp_path,
                                                                                          monkeypatch):
    result, _, _ = smoke
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "local"
    cfg = load_config([f"paths.root={root}", "experiment=smoke"])  # tracking: SQLite under paths.root
    run_id = start_run(cfg.tracking, str(root), "local", {}, {})
    record = register_final_model(cfg, run_id, result.run_dir, result.checkpoint, result.metrics)
    assert (record.name, record.version) == ("gpt-tiny-clm", "1")
    local = tracking_uri(cfg.tracking, str(root))
    assert MlflowClient(local).get_model_version("gpt-tiny-clm", "1").tags["lmforge.run_id"] == run_id
    with at_store(cfg):
        [text] = mlflow.pyfunc.load_model("models:/gpt-tiny-clm/1").predict(["def"], params={"max_new_tokens": 4})
    assert text.startswith("def")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local"]  # no ./mlruns, no ./mlflow.db


@pytest.mark.slow  # trains a real run first (shared by the module)
def test_a_model_started_from_a_pretrained_run_names_its_parent(smoke, home, server, client, tmp_path):
    result, _, _ = smoke
    parent = export(result.checkpoint, str(tmp_path / "parent"), config(home, server, [])[0])
    cfg, _ = config(home, server, ["experiment=smoke", f"model.pretrained={parent}"])
    info = json.loads((parent / EXPORT_INFO).read_text())
    tags = lineage_tags(cfg, client.get_run(result.mlflow_run_id), result.run_dir, info, "final")
    assert tags["lmforge.parent"] == str(parent)
    assert tags["lmforge.parent_run_id"] == result.mlflow_run_id
    assert tags["lmforge.parent_checkpoint"] == result.checkpoint and tags["lmforge.parent_step"] == "20"
    assert f"MLflow run `{result.mlflow_run_id}`, checkpoint `{result.checkpoint}`" in lineage_description(
        tags, info["metrics"], {})


def tiny_bert_dir(path: Path) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir()
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c"]))
    BertTokenizerFast(str(path / "vocab.txt")).save_pretrained(str(path))
    BertModel(BertConfig(vocab_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(str(path))
    return path


def test_a_contrastive_encoder_is_logged_as_a_sentence_embedder(server, client, experiment_id, tmp_path):
    from model.sentence import save_sentence_transformer

    out = tiny_bert_dir(tmp_path / "encoder")
    save_sentence_transformer(out, "mean", 16)  # as export does for objective=contrastive
    cfg, _ = config(tmp_path, server, ["experiment=smoke-simcse"])
    run = client.create_run(experiment_id)
    with at_store(cfg):
        uri, flavor, model_id = log_model(client, cfg, run, out, {})
        embeddings = mlflow.pyfunc.load_model(uri).predict(["a b c", "c b"])
    assert flavor == "sentence_transformers" and model_id in uri
    assert embeddings.shape == (2, 32)


def test_a_model_without_a_pipeline_is_logged_as_its_hugging_face_files(server, client, experiment_id, tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    out = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=8, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16,
                                        decoder_start_token_id=0)).save_pretrained(str(out))
    (out / EXPORT_INFO).write_text(json.dumps({"step": 3}))
    cfg, _ = config(tmp_path, server, ["experiment=smoke-t5"])  # span corruption: no transformers 5 pipeline
    run = client.create_run(experiment_id)
    uri, flavor, model_id = log_model(client, cfg, run, out, {})
    assert (uri, flavor, model_id) == (f"runs:/{run.info.run_id}/model", "files", None)
    files = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "down")))
    assert json.loads((files / EXPORT_INFO).read_text())["step"] == 3
    assert T5ForConditionalGeneration.from_pretrained(str(files)).config.d_model == 32


@pytest.mark.parametrize(("experiment", "head", "text"), [
    ("ft-ner", "BertForTokenClassification", "a b c"),
    ("smoke-mlm", "BertForMaskedLM", "a [MASK] c")])
def test_token_classification_and_fill_mask_models_are_logged_as_their_pipelines(
        server, client, experiment_id, tmp_path, experiment, head, text):
    import torch
    import transformers

    out = tiny_bert_dir(tmp_path / "bert")
    config_ = transformers.BertConfig.from_pretrained(str(out), id2label={0: "O", 1: "B-PER"})
    model = getattr(transformers, head)(config_)  # as export writes the task's head
    if experiment == "ft-ner":  # a tagger that finds no entity: every word is "O"
        model.classifier.bias.data = torch.tensor([10.0, -10.0])
    model.save_pretrained(str(out))
    cfg, _ = config(tmp_path, server, [f"experiment={experiment}"])
    run = client.create_run(experiment_id)
    with at_store(cfg):
        uri, flavor, _ = log_model(client, cfg, run, out, {})
        pipeline = mlflow.transformers.load_model(uri)
        predicted = mlflow.pyfunc.load_model(uri).predict([text])
    assert flavor == "transformers"
    assert type(pipeline).__name__ == {"ft-ner": "TokenClassificationPipeline",
                                       "smoke-mlm": "FillMaskPipeline"}[experiment]
    if experiment == "ft-ner":  # a sentence without entities still gets its words' labels, not an error
        assert set(predicted[0].split(",")) == {"O"}, predicted
    else:  # the token the model puts in place of [MASK]
        assert predicted[0] in ["a", "b", "c", "[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"], predicted
