"""What an lmforge run holds in MLflow, read back from a real `mlflow server` after a real 2-worker job.

One job is shared by the run-contents tests: it trains through an outage of the tracking server (killed at
about step 3, restarted at about step 8), and is then resumed from an older checkpoint with a changed key, so
steps are replayed. The tests read snapshots of the run taken after each phase.
"""

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import yaml
from mlflow import MlflowClient
from mlflow_server import MlflowServer

from orchestrator.checkpoint import is_complete
from orchestrator.config import load_config
from orchestrator.launcher import train
from orchestrator.run_record import (
    CONFIG_FILE,
    CURVE_SIZE_PX,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    LOSS_CURVE_FILE,
    MANIFEST_FILE,
    NOTE_TAG,
    OVERRIDES_FILE,
    RunRecord,
    command_line,
    description,
    git_state,
    ray_job_id,
    ui_url,
    yaml_scalar,
)
from orchestrator.schema import TrackingConfig
from orchestrator.tracking import MAX_PARAM_LENGTH, MAX_TAG_LENGTH, PARAM_TRUNCATED, TAG_TRUNCATED, start_run

MAX_STEPS = 12
RUN = ["experiment=smoke", f"trainer.max_steps={MAX_STEPS}", "trainer.log_every=1", "trainer.eval_every=4",
       "trainer.gradient_accumulation_steps=4", "checkpoint.every=2", "checkpoint.keep_last=2",
       "tracking.request_timeout_s=5", "run_name=recorded"]
# Checkpoints: the server dies after step 2's save, so it is down from about step 3, and is restarted after step
# 4's; a start takes seconds (tens of seconds on a loaded machine), so it answers again from about step 8. The
# worker waits 30 s at the end for queued metrics: a server down for longer than that loses them.
KILL_AT, RESTART_AT = 2, 4


def snapshot(client: MlflowClient, run_id: str, into: Path) -> dict:
    """Everything the tests look at, read once: the run, its loss history and its artifacts."""
    into.mkdir(parents=True)
    run = client.get_run(run_id)
    files = {f.path for f in client.list_artifacts(run_id)}
    local = Path(client.download_artifacts(run_id, "", str(into)))
    table = json.loads((local / "checkpoints.json").read_text())
    return {"run": run, "files": files, "dir": local, "on_disk": {c["step"]: is_complete(c["uri"]) for c in table},
            "losses": [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")],
            "experiment": client.get_experiment(run.info.experiment_id),
            "runs": client.search_runs([run.info.experiment_id])}


def kill_and_restart_server(server: MlflowServer, run_dir: str, events: list) -> None:
    """Drive the outage from the run's checkpoints, as they appear in its directory."""
    for step, action in ((KILL_AT, server.kill), (RESTART_AT, server.start)):
        path, deadline = f"{run_dir}/checkpoint_{step:08d}", time.time() + 300
        while not (os.path.isdir(path) and is_complete(path)):
            if time.time() > deadline:
                events.append(f"checkpoint {step} never appeared")
                server.start()
                return
            time.sleep(0.05)
        action()
        events.append(f"{action.__name__} after checkpoint {step}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One real `mlflow server` for the module (each start costs seconds); the outage test kills and restarts it."""
    server = MlflowServer(tmp_path_factory.mktemp("record_server"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, server):
    home = tmp_path_factory.mktemp("record_home")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        with pytest.MonkeyPatch.context() as env:  # the tracker bounds MLflow's HTTP waits process-wide
            for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                         "MLFLOW_HTTP_REQUEST_TIMEOUT"):
                env.setenv(name, "0")
                env.delenv(name)
            overrides = RUN + [f"tracking.tracking_uri={server.uri}", f"paths.root={home}"]
            run_dir = f"{home}/runs/recorded"
            events: list[str] = []
            outage = threading.Thread(target=kill_and_restart_server, args=(server, run_dir, events))
            outage.start()
            first = train(load_config(overrides), overrides)
            outage.join()
            client = MlflowClient(server.uri)
            trained = snapshot(client, first.mlflow_run_id, home / "after_training")

            # Stopped between checkpoints: the newest is gone, so a resume replays steps 11 and 12.
            shutil.rmtree(f"{run_dir}/checkpoint_{MAX_STEPS:08d}")
            again = [f"resume={run_dir}", f"trainer.max_steps={MAX_STEPS + 2}", f"tracking.tracking_uri={server.uri}"]
            second = train(load_config(again), again)
            resumed = snapshot(client, second.mlflow_run_id, home / "after_resume")
        yield {"home": home, "overrides": overrides, "resume": again, "events": events, "first": first,
               "second": second, "trained": trained, "resumed": resumed}
    finally:
        ray.shutdown()
        if server.proc is None:  # the outage thread failed before bringing it back
            server.start()


@pytest.mark.slow
def test_the_job_survives_a_server_outage_with_every_step_logged_once(recorded):
    assert recorded["events"] == [f"kill after checkpoint {KILL_AT}", f"start after checkpoint {RESTART_AT}"]
    trained = recorded["trained"]
    assert [r.info.run_id for r in trained["runs"]] == [recorded["first"].mlflow_run_id]
    assert trained["run"].info.status == "FINISHED"
    assert sorted(step for step, _ in trained["losses"]) == list(range(1, MAX_STEPS + 1))


@pytest.mark.slow
def test_run_holds_params_as_yaml_and_the_tags_naming_the_job(recorded):
    run = recorded["trained"]["run"]
    params, tags = run.data.params, run.data.tags
    assert params["trainer.max_steps"] == str(MAX_STEPS)
    assert params["model.pretrained"] == "null"
    assert params["data.shuffle"] in ("true", "false")
    assert tags["lmforge.objective"] == "clm"
    assert tags["lmforge.model"] == "gpt-tiny"
    assert tags["lmforge.architecture"] == "gpt2"
    assert tags["lmforge.hardware"] == "cpu"
    assert tags["lmforge.run_dir"] == recorded["first"].run_dir
    from importlib.metadata import version
    assert tags["lmforge.version"] == version("lmforge")
    # Others may commit while the test runs: the run's commit is HEAD or one of its ancestors.
    assert subprocess.run(["git", "-C", str(Path(__file__).parent), "merge-base", "--is-ancestor",
                           tags["lmforge.git_commit"], "HEAD"]).returncode == 0
    assert tags["lmforge.git_dirty"] in ("true", "false")
    assert "lmforge.ray_job_id" not in tags  # started by hand, not as a Ray job
    assert command_line(recorded["overrides"]) in tags[NOTE_TAG]
    # The experiment opens on the runs table in MLflow 3's UI, not on the GenAI traces view.
    assert recorded["trained"]["experiment"].tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


@pytest.mark.slow
def test_run_holds_config_overrides_manifest_and_checkpoint_table(recorded):
    trained = recorded["trained"]
    assert {CONFIG_FILE, OVERRIDES_FILE, MANIFEST_FILE, "checkpoints.json", LOSS_CURVE_FILE} <= trained["files"]
    config = yaml.safe_load((trained["dir"] / CONFIG_FILE).read_text())
    assert config["trainer"]["max_steps"] == MAX_STEPS and config["model"]["pretrained"] is None
    assert (trained["dir"] / OVERRIDES_FILE).read_text().splitlines() == recorded["overrides"]
    manifest = json.loads((trained["dir"] / MANIFEST_FILE).read_text())
    assert manifest["key"] == Path(trained["run"].data.tags["lmforge.prepared_data"]).name
    assert manifest["splits"]["train"]["shards"]
    table = json.loads((trained["dir"] / "checkpoints.json").read_text())
    assert [c["step"] for c in table] == list(range(2, MAX_STEPS + 1, 2))
    deleted = [c["step"] for c in table if c.get("deleted")]
    assert deleted == list(range(2, MAX_STEPS - 2, 2)), "keep_last=2 keeps the newest two; the rest are deleted"
    for record in table:
        assert trained["on_disk"][record["step"]] is not record.get("deleted", False)
        assert not record.get("deleted") or record["deleted_at"] >= record["timestamp"]


@pytest.mark.slow
def test_loss_curve_is_a_drawn_image_of_the_whole_run(recorded):
    from PIL import Image

    for phase in ("trained", "resumed"):
        with Image.open(recorded[phase]["dir"] / LOSS_CURVE_FILE) as image:
            assert image.size == CURVE_SIZE_PX
            pixels = np.asarray(image.convert("L"), dtype=float)
        assert pixels.var() > 0


@pytest.mark.slow
def test_resume_replays_steps_once_and_describes_the_changed_key(recorded):
    resumed = recorded["resumed"]
    run = resumed["run"]
    assert run.info.run_id == recorded["first"].mlflow_run_id
    steps = [step for step, _ in resumed["losses"]]
    assert sorted(steps) == list(range(1, MAX_STEPS + 3)), "steps 11 and 12 were replayed and logged once"
    assert run.data.params["trainer.max_steps"] == str(MAX_STEPS)  # params are immutable in MLflow...
    note = run.data.tags[NOTE_TAG]  # ...so the description says what the resume changed
    assert command_line(recorded["overrides"]) in note and command_line(recorded["resume"]) in note
    assert f"| trainer.max_steps | `{MAX_STEPS}` | `{MAX_STEPS + 2}` |" in note
    assert "| resume |" not in note and "| run_name |" not in note
    overrides = (resumed["dir"] / OVERRIDES_FILE).read_text().splitlines()
    assert overrides[:len(recorded["overrides"])] == recorded["overrides"]
    assert overrides[-len(recorded["resume"]):] == recorded["resume"]
    table = json.loads((resumed["dir"] / "checkpoints.json").read_text())
    assert [c["step"] for c in table if not c.get("deleted")] == [MAX_STEPS, MAX_STEPS + 2]
    assert yaml.safe_load((resumed["dir"] / CONFIG_FILE).read_text())["trainer"]["max_steps"] == MAX_STEPS + 2


def test_limits_never_fail_a_run(server, tmp_path):
    cfg = TrackingConfig(tracking_uri=server.uri, request_timeout_s=5)
    params = {f"group{g}": {f"key{i}": i for i in range(50 * g, 50 * g + 50)} for g in range(10)}
    params["notes"] = "x" * 10_000
    run_id = start_run(cfg, str(tmp_path), "limits", params, {"lmforge.long": "y" * 10_000})
    run = MlflowClient(server.uri).get_run(run_id)
    assert len(run.data.params) == 501
    assert run.data.params["group9.key499"] == "499"
    long_param, long_tag = run.data.params["notes"], run.data.tags["lmforge.long"]
    assert len(long_param) == MAX_PARAM_LENGTH and long_param.endswith(PARAM_TRUNCATED)
    assert len(long_tag) == MAX_TAG_LENGTH and long_tag.endswith(TAG_TRUNCATED)


def test_existing_experiment_without_a_kind_gets_the_runs_view(tmp_path):
    root = str(tmp_path / "root")
    cfg = TrackingConfig()
    from orchestrator.tracking import connect

    client = connect(cfg, root)
    experiment_id = client.create_experiment(cfg.experiment)  # as an older lmforge made it
    start_run(cfg, root, "job", {}, {})
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_command_line_is_shell_quoted_and_masks_credentials():
    line = command_line(["data.paths=['a b.txt']", "tracking.tracking_uri=https://bob:hunter2@mlflow.example.com",
                         "runtime_env.env_vars.HF_TOKEN=hf_secret"])
    assert line.startswith("lmforge train 'data.paths=['\"'\"'a b.txt'\"'\"']' ")
    assert "hunter2" not in line and "hf_secret" not in line
    assert "runtime_env.env_vars.HF_TOKEN=***" in line


@pytest.mark.parametrize(("value", "text"), [(None, "null"), (True, "true"), (False, "false"), (0.001, "0.001"),
                                             (3, "3"), ("text", "text"), (["a", None], '["a", null]')])
def test_param_values_read_as_yaml(value, text):
    assert yaml_scalar(value) == text


def test_git_and_ray_job_tags_only_where_they_apply(tmp_path, monkeypatch):
    assert git_state(tmp_path) == {}  # not a checkout: no tags, no error
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert git_state(Path(__file__).parent) == {}
    monkeypatch.delenv("RAY_JOB_ID", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert ray_job_id() is None
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"job_submission_id": "raysubmit_1"}}))
    assert ray_job_id() == "raysubmit_1"


def test_ui_links_open_the_model_training_view():
    # MLflow 3.17's UI picks GenAI or model training from the URL (checked in headless Chromium by hand: a link
    # without the parameter lands on "Traces 0 / No data available"); the description's parent link carries it.
    note = description(RunRecord("lmforge train", parent_run_id="abc"), parent_experiment_id="3")
    assert "[abc](#/experiments/3/runs/abc?workflowType=machine_learning)" in note
    assert ui_url("http://127.0.0.1:5000/", "3") == "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"


def test_system_metrics_switch_samples_into_the_run(tmp_path, monkeypatch):
    from orchestrator.tracker import RunTracker
    from orchestrator.tracking import connect

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # MLflow's default is 10 s
    root = str(tmp_path / "root")
    cfg = TrackingConfig(system_metrics=True)
    run_id = start_run(cfg, root, "sampled", {}, {})
    tracker = RunTracker(cfg, root, run_id)
    client = connect(cfg, root)
    deadline = time.monotonic() + 60
    while not any(k.startswith("system/") for k in client.get_run(run_id).data.metrics):
        assert time.monotonic() < deadline, "no system/* metric within a minute"
        time.sleep(0.5)
    tracker.close()
    assert "system/cpu_utilization_percentage" in client.get_run(run_id).data.metrics
