"""W&B as a second logger in offline mode (no network): its run directory holds the loss history, read back with
wandb's own reader of the .wandb log (`wandb leet inspect --json`); a failing W&B never stops anything."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.schema import WandbConfig
from orchestrator.wandb_logger import WandbLogger, wandb_run_id

WANDB = str(Path(sys.executable).parent / "wandb")


def history(run_dir: str) -> dict[int, dict]:
    """Each logged step's values, from the run's .wandb transaction log."""
    out = subprocess.run([WANDB, "leet", "inspect", "--json", run_dir], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {r["history"]["step"]["num"]: r["history"]["item"] for r in records if r.get("type") == "history"}


def run_record(run_dir: str) -> dict:
    out = subprocess.run([WANDB, "leet", "inspect", "--json", run_dir], capture_output=True, text=True, timeout=60)
    [run] = [json.loads(line)["run"] for line in out.stdout.splitlines() if '"type":"run"' in line]
    return run


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)


def test_logger_writes_loss_history_config_and_name_offline(tmp_path, offline):
    logger = WandbLogger(WandbConfig(enabled=True, project="lmforge-test"), str(tmp_path))
    config = {"trainer": {"lr": 0.003}, "data": {"api_key": "hf_secretsecretsecretsecretsecret123"}}
    logger.start("gpt-tiny-clm-1", config, run_key="0123abcd")
    for step, loss in [(5, 4.0), (10, 3.5), (15, 3.0)]:
        logger.log({"train/loss": loss, "train/lr": 0.003}, step)
    logger.log({"train/loss": 9.9}, 10)  # a replayed step after a restart: already in the run
    logger.finish(0)

    assert Path(logger.run_dir).is_relative_to(tmp_path / "wandb")
    steps = history(logger.run_dir)
    assert {s: v["train/loss"] for s, v in steps.items()} == {5: 4.0, 10: 3.5, 15: 3.0}
    run = run_record(logger.run_dir)
    assert run["run_id"] == "0123abcd" and run["display_name"] == "gpt-tiny-clm-1"
    assert run["config"]["update"]["trainer.lr"] == 0.003 and run["config"]["update"]["data.api_key"] == "***"


def test_resumed_run_continues_the_same_wandb_run(tmp_path, offline):
    for steps in ([1, 2], [3, 4]):  # two attempts of one run (a worker restart, or resume=)
        logger = WandbLogger(WandbConfig(enabled=True), str(tmp_path))
        logger.start("run-a", {}, run_key="f3e2d1c0b9a8")
        for step in steps:
            logger.log({"train/loss": float(step)}, step)
        logger.finish(0)
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    # One W&B run id for both: `wandb sync` (or an online run's resume="allow") continues the same run.
    assert len(runs) == 2 and all(run_record(str(r))["run_id"] == "f3e2d1c0b9a8" for r in runs)
    assert [sorted(history(str(r))) for r in runs] == [[1, 2], [3, 4]]


def test_run_ids_are_what_wandb_accepts():
    assert wandb_run_id("runs/my run:2") == "runs-my-run-2"
    assert len(wandb_run_id("x" * 100)) == 64


def test_a_failing_wandb_turns_itself_off_with_one_warning(tmp_path, offline, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    logger = WandbLogger(WandbConfig(enabled=True), str(blocker / "sub"))
    with caplog.at_level(logging.WARNING, logger="lmforge.wandb"):
        logger.start("run-b", {"trainer": {"lr": 0.1}}, run_key="abc")
        logger.log({"train/loss": 1.0}, 1)
        logger.finish(1)
    assert not logger.enabled and logger.run_dir is None
    [warning] = [r.getMessage() for r in caplog.records]
    assert "W&B could not start a run" in warning and "MLflow goes on" in warning and "\n" not in warning


def test_disabled_logger_does_nothing(tmp_path, offline):
    logger = WandbLogger(WandbConfig(enabled=False), str(tmp_path))
    logger.start("run-c", {}, run_key="abc")
    logger.log({"train/loss": 1.0}, 1)
    logger.finish(0)
    assert not (tmp_path / "wandb").exists()


@pytest.mark.slow
def test_training_run_with_wandb_offline_logs_the_same_losses_as_mlflow(tmp_path, offline, one_thread):
    import ray
    from run_helpers import losses

    from orchestrator.config import load_config
    from orchestrator.launcher import train

    overrides = ["experiment=smoke", "trainer.max_steps=10", "tracking=mlflow-wandb", "tracking.wandb.mode=offline",
                 f"paths.root={tmp_path}"]
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        result = train(load_config(overrides), overrides)
    finally:
        ray.shutdown()
    [run_dir] = (tmp_path / "wandb").glob("offline-run-*")
    assert run_record(str(run_dir))["run_id"] == result.mlflow_run_id
    logged = {step: values["train/loss"] for step, values in history(str(run_dir)).items() if "train/loss" in values}
    assert logged == pytest.approx(losses(tmp_path, result.mlflow_run_id))
