"""End-to-end training on a real local Ray cluster with 2 CPU workers under real DeepSpeed ZeRO.

These runs are the promises users care about: the loss falls under every ZeRO stage, a worker killed with
SIGKILL is replaced and the run's per-step losses equal an uninterrupted run's, a crash in the middle of a
checkpoint save never produces a checkpoint that resume would pick, and the HF export gives the same loss.
"""

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import ray
from mlflow.tracking import MlflowClient
from model_helpers import exported_val_loss
from run_helpers import assert_same_losses, losses, restored_steps, run_killing_a_worker

from common.errors import LmforgeError
from data.prepared import prepare_training_data, read_meta
from orchestrator.checkpoint import (
    FAULT_ENV,
    TORN_UPLOAD_ENV,
    complete_marker,
    is_complete,
    latest_checkpoint,
    list_checkpoints,
    read_marker,
)
from orchestrator.config import load_config
from orchestrator.launcher import train
from orchestrator.runs import read_run_info
from orchestrator.tracking import tracking_uri

pytestmark = pytest.mark.slow

# The kill, crash and export tests train on a WebDataset corpus prepared with Ray Data (data=webdataset).
# Gradient accumulation slows each step to a few tenths of a second, leaving time to kill a worker mid-run.
RUN = ["experiment=smoke", "trainer.max_steps=24", "trainer.gradient_accumulation_steps=8", "trainer.log_every=1",
       "checkpoint.every=8", "checkpoint.keep_last=2", "trainer.eval_every=12", "data=webdataset"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_home")
    write_tar_corpus(root / "corpus", docs_per_shard=10)
    RUN.append(f"data.paths=['{root}/corpus/*.tar']")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    cfg = load_config(RUN + [f"paths.root={root}"])
    prepared = prepare_training_data(cfg.data, cfg.paths.root, cfg.seed, engine="ray")
    assert read_meta(prepared)["engine"] == "ray"
    yield root
    ray.shutdown()


def write_tar_corpus(folder, docs_per_shard: int) -> None:
    """The Python reference as WebDataset input shards: one `<key>.txt` member per topic."""
    from pydoc_data.topics import topics

    folder.mkdir(parents=True)
    names = sorted(topics)
    for shard, start in enumerate(range(0, len(names), docs_per_shard)):
        with tarfile.open(folder / f"corpus-{shard:04d}.tar", "w") as tar:
            for name in names[start:start + docs_per_shard]:
                payload = topics[name].encode()
                info = tarfile.TarInfo(f"{name.replace('.', '_')}.txt")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def baseline(home):
    return run(home, RUN + ["run_name=baseline"])


def run(home, overrides, worker_env=None):
    cfg = load_config(overrides + [f"paths.root={home}"])
    return train(cfg, overrides + [f"paths.root={home}"], worker_env=worker_env)


def test_baseline_loss_falls_and_checkpoints_are_complete(home, baseline):
    per_step = losses(home, baseline.mlflow_run_id)
    assert sorted(per_step) == list(range(1, 25))
    assert per_step[24] < per_step[1] - 0.5, per_step
    steps = [step for step, _ in list_checkpoints(baseline.run_dir)]
    assert steps == [16, 24], "checkpoint.keep_last=2 keeps the newest two"
    client = MlflowClient(tracking_uri(load_config([f"paths.root={home}"]).tracking, str(home)))
    recorded = json.loads(Path(client.download_artifacts(baseline.mlflow_run_id, "checkpoints.json")).read_text())
    assert [c["step"] for c in recorded] == [8, 16, 24]
    assert all(c["uri"].startswith(baseline.run_dir) and c["size_bytes"] > 0 for c in recorded)
    marker = read_marker(baseline.checkpoint)
    assert marker["world_size"] == 2 and marker["loader"]["position"] > 0
    files = marker["files"]
    assert any("zero_pp_rank_0" in f for f in files) and any("zero_pp_rank_1" in f for f in files)
    assert baseline.seconds_to_first_step is not None


# ZeRO-3 is covered by test_zero3_resume_on_fewer_workers (training, resharding) and by the MiniLM
# contrastive run in test_pretraining.py (training, export from partitioned parameters).
@pytest.mark.parametrize(("stage", "model"), [(0, "gpt-tiny"), (1, "llama-tiny")])
def test_other_zero_stages_train_and_export(home, tmp_path, stage, model):
    result = run(home, ["experiment=smoke", "trainer.max_steps=12", "trainer.log_every=1", "checkpoint.every=12",
                        f"hardware.zero_stage={stage}", f"model={model}", f"run_name=zero{stage}"])
    per_step = losses(home, result.mlflow_run_id)
    assert per_step[12] < per_step[1] - 0.3, per_step
    assert is_complete(result.checkpoint)
    assert exported_val_loss(home, result, tmp_path) == pytest.approx(result.metrics["val/loss"], abs=1e-4)


def test_sigkilled_worker_resumes_with_identical_losses(home, baseline):
    result = run_killing_a_worker(lambda: run(home, RUN + ["run_name=killed"]), f"{home}/runs/killed")
    assert latest_checkpoint(result.run_dir).endswith("checkpoint_00000024")
    assert restored_steps(home, result.mlflow_run_id) in ([8], [16]), "the restart did not resume a checkpoint"
    expected, actual = losses(home, baseline.mlflow_run_id), losses(home, result.mlflow_run_id)
    assert sorted(actual) == sorted(expected)
    np.testing.assert_allclose([actual[s] for s in sorted(actual)], [expected[s] for s in sorted(expected)],
                               rtol=0, atol=1e-6)


def test_crash_before_commit_resumes_from_previous_checkpoint(home, baseline, tmp_path):
    fault = {FAULT_ENV: f"16:{tmp_path}/crashed-once"}
    with pytest.raises(LmforgeError):
        run(home, RUN + ["run_name=crashed", "trainer.max_failures=0"], worker_env=fault)
    run_dir = f"{home}/runs/crashed"
    assert latest_checkpoint(run_dir).endswith("checkpoint_00000008")
    assert not is_complete(f"{run_dir}/checkpoint_00000016")

    # Resume by MLflow run id: the same MLflow run continues, and the losses match the uninterrupted run.
    run_id = read_run_info(run_dir)["mlflow_run_id"]
    resumed = run(home, [f"resume={run_id}"])
    assert resumed.mlflow_run_id == run_id
    assert restored_steps(home, run_id) == [8]
    expected, actual = losses(home, baseline.mlflow_run_id), losses(home, run_id)
    np.testing.assert_allclose([actual[s] for s in range(1, 25)], [expected[s] for s in range(1, 25)],
                               rtol=0, atol=1e-6)
    client = MlflowClient(tracking_uri(load_config([f"paths.root={home}"]).tracking, str(home)))
    assert client.get_run(run_id).info.status == "FINISHED"


def test_export_round_trip_gives_training_val_loss(home, baseline, tmp_path):
    assert exported_val_loss(home, baseline, tmp_path) == pytest.approx(baseline.metrics["val/loss"], abs=1e-4)


def copy_run(baseline, name: str) -> str:
    """A copy of the baseline run under another name, with an MLflow run of its own."""
    import shutil

    run_dir = f"{Path(baseline.run_dir).parent}/{name}"
    shutil.copytree(baseline.run_dir, run_dir)
    info = read_run_info(run_dir)
    info["run_name"], info["mlflow_run_id"] = name, None
    (Path(run_dir) / "lmforge_run.json").write_text(json.dumps(info))
    return run_dir


def test_resume_on_fewer_workers_trains_the_rest_of_the_epoch_with_the_same_global_batch(home, baseline):
    """2 workers -> 1, mid-epoch: DeepSpeed state is resharded through a universal checkpoint, gradient
    accumulation doubles so the global batch stays 64 sequences, and the one worker trains exactly the samples
    the epoch has left (as a set), in the epoch's order, before the next epoch begins."""
    from data.loader import ResumableLoader
    from data.prepared import open_split
    from orchestrator.worker import TRACE_SAMPLES_ENV

    run_dir = copy_run(baseline, "shrunk")
    before = read_marker(baseline.checkpoint)["loader"]
    store = open_split(read_run_info(run_dir)["prepared"], "train")
    start, n = before["position"], len(store)
    remaining = n - start % n
    assert start % n > 0 and remaining > 64, "the checkpoint must be mid-epoch"
    steps = -(-remaining // 64)  # enough 64-sequence steps to finish the epoch
    trace = Path(home) / "trace-shrunk"
    resumed = run(home, [f"resume={run_dir}", "hardware.workers=1", f"trainer.max_steps={24 + steps}",
                         "trainer.eval_every=0"], worker_env={TRACE_SAMPLES_ENV: str(trace)})
    marker = read_marker(resumed.checkpoint)
    assert marker["world_size"] == 1 and marker["config"]["trainer"]["gradient_accumulation_steps"] == 16
    assert marker["loader"]["position"] - start == steps * 64, "every step took 64 sequences"
    trained = [int(i) for i in (trace / "rank0.txt").read_text().split()]
    epoch = ResumableLoader(store, 4, 0, 1, seed=1234).sample_ids(start - start % n, n).tolist()
    seen_before, rest_of_epoch = set(epoch[:start % n]), trained[:remaining]
    assert rest_of_epoch == epoch[start % n:], "the epoch's own order continues"
    assert set(rest_of_epoch) | seen_before == set(range(n)) and not set(rest_of_epoch) & seen_before
    after = losses(home, resumed.mlflow_run_id)
    assert sorted(after) == list(range(25, 25 + steps))
    assert abs(after[25] - losses(home, baseline.mlflow_run_id)[24]) < 0.15


def test_reshard_to_one_worker_keeps_master_weights_and_adam_moments_exactly(home, baseline):
    """The 2-worker ZeRO-2 checkpoint loaded into a 1-worker engine, as a resume on fewer workers does: every
    parameter's fp32 master weight and both Adam moments equal the checkpoint's shards consolidated."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    env = os.environ | {"PYTHONPATH": str(repo), "DS_ACCELERATOR": "cpu"}
    out = subprocess.run([sys.executable, str(repo / "tests" / "reshard_probe.py"), baseline.checkpoint,
                          read_run_info(baseline.run_dir)["prepared"]], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["params"] > 0 and report["moments_nonzero"]
    assert report["max_abs_diff"] == {"fp32": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}


def test_torn_newest_checkpoint_is_skipped_by_export_and_resume(home, baseline, tmp_path, capfd):
    """A shard of the newest checkpoint is cut short after its marker was written (storage lost bytes):
    export and resume both use the checkpoint before it and say why, and training saves that step again."""
    from orchestrator.export import export

    run_dir = copy_run(baseline, "torn")
    newest = Path(run_dir) / "checkpoint_00000024"
    shard = max((p for p in (newest / "ds").iterdir()), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    out = export(run_dir, str(tmp_path / "hf"), load_config([f"paths.root={home}"]))
    assert json.loads((out / "lmforge_export.json").read_text())["step"] == 16
    err = capfd.readouterr().err
    assert f"skipping checkpoint {newest}" in err and "a torn upload" in err, err

    resumed = run(home, [f"resume={run_dir}"])
    assert restored_steps(home, resumed.mlflow_run_id) == [16]
    assert "skipping checkpoint" in capfd.readouterr().err
    assert complete_marker(str(newest), checksums=True), "step 24 is saved again, whole"
    assert_same_losses(home, baseline.mlflow_run_id, resumed.mlflow_run_id, range(17, 25))


def test_rank_killed_mid_upload_never_leaves_a_checkpoint_resume_selects(home, baseline, tmp_path):
    """The last rank writes half of a shard into storage, under its real name, and dies: Ray restarts the
    workers, which must resume step 8, not the torn step 16, and reproduce the uninterrupted losses."""
    fault = {TORN_UPLOAD_ENV: f"16:{tmp_path}/torn-once"}
    result = run(home, RUN + ["run_name=torn-upload"], worker_env=fault)
    assert (tmp_path / "torn-once").exists(), "the fault never fired"
    assert restored_steps(home, result.mlflow_run_id) == [8]
    assert [step for step, _ in list_checkpoints(result.run_dir, checksums=True)] == [16, 24]
    assert_same_losses(home, baseline.mlflow_run_id, result.mlflow_run_id, range(1, 25))


def test_resume_from_an_older_checkpoint_forks_from_that_step(home, baseline, capfd):
    older = f"{baseline.run_dir}/checkpoint_00000016"
    forked = run(home, [f"resume={older}"])
    assert "continuing it as the new run baseline-from16" in capfd.readouterr().err
    assert forked.run_name == "baseline-from16" and forked.run_dir != baseline.run_dir
    assert read_run_info(forked.run_dir)["parent"]["checkpoint"] == older
    assert restored_steps(home, forked.mlflow_run_id) == [16]
    assert sorted(losses(home, forked.mlflow_run_id)) == list(range(17, 25))
    assert_same_losses(home, baseline.mlflow_run_id, forked.mlflow_run_id, range(17, 25))
    assert [step for step, _ in list_checkpoints(baseline.run_dir)] == [16, 24], "the original is untouched"
    client = MlflowClient(tracking_uri(load_config([f"paths.root={home}"]).tracking, str(home)))
    assert client.get_run(forked.mlflow_run_id).data.tags["mlflow.parentRunId"] == baseline.mlflow_run_id


def test_resume_with_data_shuffle_flipped_is_refused(home, baseline):
    with pytest.raises(LmforgeError, match="data.shuffle was True, now False"):
        run(home, [f"resume={baseline.run_dir}", "trainer.max_steps=30", "data.shuffle=false"])


def test_deleted_newest_checkpoint_resumes_from_the_one_before(home):
    """Deleting a checkpoint by hand leaves Ray's checkpoint-manager snapshot naming it; lmforge's markers
    decide what exists, so the resume continues from the previous checkpoint."""
    import shutil

    first = run(home, ["experiment=smoke", "trainer.max_steps=6", "checkpoint.every=3", "trainer.log_every=1",
                       "run_name=deleted"])
    shutil.rmtree(first.checkpoint)
    resumed = run(home, [f"resume={first.run_dir}"])
    assert restored_steps(home, first.mlflow_run_id) == [3]
    assert resumed.checkpoint.endswith("checkpoint_00000006")


def test_zero3_resume_on_fewer_workers(home):
    first = run(home, ["experiment=smoke", "trainer.max_steps=10", "checkpoint.every=10", "trainer.log_every=1",
                       "hardware.zero_stage=3", "run_name=zero3-shrink"])
    resumed = run(home, [f"resume={first.run_dir}", "hardware.workers=1", "trainer.max_steps=12"])
    assert read_marker(resumed.checkpoint)["world_size"] == 1
    per_step = losses(home, first.mlflow_run_id)
    assert restored_steps(home, first.mlflow_run_id) == [10]
    # Continuing, not restarting: a fresh model would be back near ln(512) = 6.2.
    assert abs(per_step[11] - per_step[10]) < 0.15, per_step


def test_resume_on_more_workers_continues_from_the_checkpoint(home):
    """1 worker -> 2: the ZeRO-2 optimizer state is split across more ranks through a universal checkpoint."""
    first = run(home, ["experiment=smoke", "trainer.max_steps=10", "checkpoint.every=10", "trainer.log_every=1",
                       "hardware.workers=1", "trainer.gradient_accumulation_steps=2", "run_name=zero2-grow"])
    assert read_marker(first.checkpoint)["world_size"] == 1
    resumed = run(home, [f"resume={first.run_dir}", "hardware.workers=2", "trainer.max_steps=12"])
    assert read_marker(resumed.checkpoint)["world_size"] == 2
    # The global batch of 8 sequences stays: 2 workers x 4 sequences, no accumulation.
    assert read_marker(resumed.checkpoint)["config"]["trainer"]["gradient_accumulation_steps"] == 1
    per_step = losses(home, first.mlflow_run_id)
    assert restored_steps(home, first.mlflow_run_id) == [10]
    assert sorted(per_step) == list(range(1, 13))
    # Continuing, not restarting: a fresh model would be back near ln(512) = 6.2.
    assert abs(per_step[11] - per_step[10]) < 0.15, per_step
    assert read_marker(resumed.checkpoint)["loader"]["position"] > read_marker(first.checkpoint)["loader"]["position"]
