"""Checkpoint integrity, resume planning and failure policy without starting Ray: what makes a checkpoint
complete, how a resume picks its data and config, and which worker errors are never retried."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.errors import LmforgeError
from orchestrator import checkpoint, resume, runs
from orchestrator.config import load_config, to_dict

REPO = Path(__file__).resolve().parent.parent


def fake_checkpoint(run_dir: Path, step: int, files: dict[str, bytes], commit: bool = True) -> Path:
    """A checkpoint directory as a save leaves it: the ranks' files, then (if committed) the marker."""
    path = run_dir / checkpoint.dir_name(step)
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    if commit:
        checkpoint.commit(str(path), {"step": step, "world_size": 2, "loader": {}, "metrics": {}, "config": {},
                                      "files": checkpoint.file_digests(path)})
    return path


def test_truncated_or_missing_file_makes_a_checkpoint_incomplete_and_says_why(tmp_path):
    good = fake_checkpoint(tmp_path, 8, {"ds/shard_rank0.pt": b"a" * 100, "ds/shard_rank1.pt": b"b" * 100})
    torn = fake_checkpoint(tmp_path, 16, {"ds/shard_rank0.pt": b"a" * 100, "ds/shard_rank1.pt": b"b" * 100})
    (torn / "ds/shard_rank1.pt").write_bytes(b"b" * 50)  # the rank died halfway through its upload
    gone = fake_checkpoint(tmp_path, 24, {"ds/shard_rank0.pt": b"a" * 100, "ds/shard_rank1.pt": b"b" * 100})
    (gone / "ds/shard_rank0.pt").unlink()
    fake_checkpoint(tmp_path, 32, {"ds/shard_rank0.pt": b"a"}, commit=False)

    found = checkpoint.scan(str(tmp_path))
    assert found.complete == [(8, str(good))]
    reasons = dict(found.rejected)
    assert "ds/shard_rank1.pt is 50 bytes, its marker says 100" in reasons[str(torn)]
    assert "ds/shard_rank0.pt is missing" in reasons[str(gone)]
    assert "no completion marker" in reasons[str(tmp_path / checkpoint.dir_name(32))]
    assert checkpoint.latest_checkpoint(str(tmp_path)) == str(good)


def test_verify_compares_checksums_of_same_size_files(tmp_path):
    path = fake_checkpoint(tmp_path, 8, {"ds/shard.pt": b"a" * 100})
    (path / "ds/shard.pt").write_bytes(b"x" * 100)  # same size, different bytes: silent corruption
    assert checkpoint.latest_checkpoint(str(tmp_path)) == str(path), "sizes alone cannot see it"
    marker, why = checkpoint.inspect(str(path), checksums=True)
    assert marker is None and "does not match its checksum" in why


def test_checkpoints_from_before_sizes_were_recorded_still_resume(tmp_path):
    path = tmp_path / checkpoint.dir_name(8)
    (path / "ds").mkdir(parents=True)
    (path / "ds/shard.pt").write_bytes(b"a")
    (path / checkpoint.MARKER).write_text(json.dumps({"step": 8, "files": ["ds/shard.pt"]}))
    assert checkpoint.list_checkpoints(str(tmp_path)) == [(8, str(path))]


def test_prune_keeps_the_newest_complete_and_drops_older_torn_saves(tmp_path):
    for step in (8, 16, 24):
        fake_checkpoint(tmp_path, step, {"ds/s.pt": b"a"})
    fake_checkpoint(tmp_path, 12, {"ds/s.pt": b"a"}, commit=False)
    checkpoint.prune(str(tmp_path), keep_last=2, newest_step=24)
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.dir_name(16), checkpoint.dir_name(24)]


def test_numpy_rng_stream_after_restore_is_identical(tmp_path):
    """The whole bit-generator state, position and cached Gaussian included, survives a save."""
    import torch

    np.random.seed(7)
    np.random.standard_normal()  # leaves a cached Gaussian
    np.random.randint(0, 100, 3)
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    expected = [np.random.standard_normal(), *np.random.randint(0, 1000, 5), np.random.random()]
    np.random.seed(99)
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert [np.random.standard_normal(), *np.random.randint(0, 1000, 5), np.random.random()] == expected


def test_data_changes_name_the_shuffle_and_the_shards():
    saved = {"prepared": "pydoc-abc", "shuffle": True, "num_samples": 10, "shard_sizes": [5, 5]}
    assert checkpoint.data_changes(saved, dict(saved)) == []
    assert checkpoint.data_changes(saved, saved | {"shuffle": False}) == ["data.shuffle was True, now False"]
    resharded = checkpoint.data_changes(saved, saved | {"shard_sizes": [10]})
    assert resharded and "shards were 2" in resharded[0]
    with pytest.raises(LmforgeError, match="data.shuffle was True, now False"):
        checkpoint.check_same_data({"data": saved}, saved | {"shuffle": False}, "ckpt")


def saved_run(run_dir: Path, overrides: list[str]) -> None:
    cfg = load_config(overrides)
    runs.write_run_info(str(run_dir), {"run_name": run_dir.name, "mlflow_run_id": None, "config": to_dict(cfg),
                                       "prepared": "unused"})


def test_pipe_source_from_a_run_file_never_runs_on_resume(tmp_path):
    """Someone who can write to shared run storage plants a shell command as the data source."""
    run_dir = tmp_path / "runs" / "shared"
    canary = tmp_path / "canary"
    saved_run(run_dir, ["data=webdataset", f"data.paths=['pipe:touch {canary}']"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "LMFORGE_"))}
    env["LMFORGE_HOME"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", f"resume={run_dir}"], cwd=REPO,
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "pipe:touch" in out.stderr and "never runs a command" in out.stderr and "Traceback" not in out.stderr
    assert not canary.exists()


def test_pipe_source_given_again_on_the_command_line_is_used(tmp_path):
    run_dir = tmp_path / "runs" / "shared"
    saved_run(run_dir, ["data=webdataset", "data.paths=['pipe:cat shard.tar']"])
    cfg = load_config([f"resume={run_dir}", "data.paths=['pipe:cat shard.tar']"])
    plan = resume.plan(cfg, [f"resume={run_dir}", "data.paths=['pipe:cat shard.tar']"])
    assert plan.cfg.data.paths == ["pipe:cat shard.tar"]


def test_redacted_value_must_be_given_again(tmp_path):
    run_dir = tmp_path / "runs" / "secret"
    saved_run(run_dir, ["tracking=mlflow-server", "tracking.tracking_uri=https://bob:hunter2@mlflow.example"])
    info = runs.read_run_info(str(run_dir))
    info["config"]["tracking"]["tracking_uri"] = "https://***@mlflow.example"  # as lmforge train saves it
    (run_dir / runs.RUN_INFO).write_text(json.dumps(info))
    with pytest.raises(LmforgeError, match="tracking.tracking_uri was saved redacted"):
        resume.plan(load_config([f"resume={run_dir}"]), [f"resume={run_dir}"])
    again = [f"resume={run_dir}", "tracking.tracking_uri=https://bob:hunter2@mlflow.example"]
    assert resume.plan(load_config(again), again).cfg.tracking.tracking_uri.endswith("@mlflow.example")


def test_fewer_workers_on_resume_keep_the_global_batch(tmp_path):
    run_dir = tmp_path / "runs" / "big"
    saved_run(run_dir, ["trainer.micro_batch_size=4", "trainer.gradient_accumulation_steps=3", "hardware.workers=2"])
    shrunk = [f"resume={run_dir}", "hardware.workers=1"]
    assert resume.plan(load_config(shrunk), shrunk).cfg.trainer.gradient_accumulation_steps == 6
    odd = [f"resume={run_dir}", "hardware.workers=5"]
    with pytest.raises(LmforgeError, match="global batch of 24 sequences .* cannot be kept on 5 workers"):
        resume.plan(load_config(odd), odd)
    explicit = [f"resume={run_dir}", "hardware.workers=1", "trainer.gradient_accumulation_steps=1"]
    assert resume.plan(load_config(explicit), explicit).cfg.trainer.gradient_accumulation_steps == 1


def test_elastic_worker_range_must_keep_the_global_batch():
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="hardware.min_workers=2 .* global batch of 12 sequences"):
        load_config(["hardware.workers=3", "hardware.min_workers=2", "trainer.micro_batch_size=4"])
    load_config(["hardware.workers=2", "hardware.min_workers=1", "trainer.micro_batch_size=4"])


def test_relative_resume_path_means_one_under_the_working_directory(tmp_path, monkeypatch):
    saved_run(tmp_path / "runs" / "here", [])
    monkeypatch.chdir(tmp_path)
    target = runs.resolve("runs/here", load_config([]))
    assert target.run_dir == str(tmp_path / "runs" / "here")


def test_a_worker_user_error_is_not_retried():
    from ray.train import FailureConfig
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from orchestrator.failures import failure_policy

    policy = failure_policy(FailureConfig(max_failures=3))
    bad_data = WorkerGroupError("worker failed", {1: LmforgeError("data: 3 samples cannot fill one batch")})
    assert policy.make_decision(bad_data) == FailureDecision.RAISE
    crash = WorkerGroupError("worker failed", {1: RuntimeError("connection reset")})
    assert policy.make_decision(crash) == FailureDecision.RETRY


def test_prepared_data_left_half_written_by_a_killed_process_is_removed(tmp_path):
    from data.prepared import remove_abandoned

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    abandoned = tmp_path / f"pydoc-0123.tmp-{dead}"
    (abandoned / "train-000000.tar").parent.mkdir(parents=True)
    (abandoned / "train-000000.tar").write_bytes(b"x" * 1024)
    live = tmp_path / f"pydoc-4567.tmp-{os.getpid()}"
    live.mkdir()
    assert remove_abandoned(tmp_path) == [abandoned]
    assert not abandoned.exists() and live.is_dir()


def test_a_checkpoint_file_holding_code_is_refused_with_lmforge_own_message(tmp_path):
    import pickle

    import torch  # noqa: F401  (torch.load is what must refuse)

    canary = tmp_path / "canary"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps({"module": Payload()}))
    with pytest.raises(LmforgeError) as refused:
        checkpoint.check_safe_to_load(tmp_path)
    message = str(refused.value)
    assert "corrupt or holds objects other than tensors" in message and "never unpickles" in message
    assert "weights_only=False" not in message, "no advice to turn the protection off"
    assert not canary.exists()


def test_export_refuses_a_checkpoint_without_its_untied_head():
    from model.build import build_model
    from model.config import ModelConfig
    from orchestrator.export import load_weights

    untied = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=16, max_seq_len=8, tie_embeddings=False), 64, 0)
    state = {k: v for k, v in untied.state_dict().items() if k != "lm_head.weight"}
    with pytest.raises(LmforgeError, match="missing \\['lm_head.weight'\\]"):
        load_weights(untied, state, "checkpoint x does not match")
    tied = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=16, max_seq_len=8), 64, 0)
    load_weights(tied, {k: v for k, v in tied.state_dict().items() if k != "lm_head.weight"}, "unused")


def test_a_saving_step_without_a_grad_norm_checks_the_weights():
    """ZeRO-0 without clipping has no gradient norm: a finite loss with non-finite weights is divergence."""
    from orchestrator.worker import divergence

    assert divergence(2.5, None, 10, "/nonexistent", weights_ok=True) is None
    message = divergence(2.5, None, 10, "/nonexistent", weights_ok=False)
    assert message and message.startswith("weights=inf/nan by step 10: training diverged")
