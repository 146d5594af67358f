"""`lmforge sweep`: Hydra sweep expressions into a Ray Tune search, checked before any trial starts; and
end to end on a real local Ray cluster, with real DeepSpeed trials, ASHA, MLflow parent and child runs,
a crashed trial retried from its checkpoint, and an interrupted sweep resumed."""

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from run_helpers import losses, metric_history, restored_steps

from common.errors import LmforgeError
from orchestrator import cli
from orchestrator.checkpoint import latest_checkpoint, step_of
from orchestrator.config import load_config
from orchestrator.runs import read_run_info
from orchestrator.sweep import plan, run_sweep, start_ray
from orchestrator.sweep_space import split_overrides, train_command, trial_overrides, tune_space

REPO = Path(__file__).resolve().parent.parent
# A few-second trial: a 1-2 layer GPT of width 64, evaluated and checkpointed every 4 of its 8 steps.
TINY = ["experiment=smoke", "trainer.max_steps=8", "trainer.eval_every=4", "checkpoint.every=4",
        "trainer.log_every=4", "trainer.warmup_steps=1", "trainer.min_lr=0", "trainer.eval_batches=1"]
# Grid order varies the last key fastest, so the two trials with the useless learning rate come last: each
# starts only once an earlier trial has ended, after reporting at ASHA's step-4 rung. A trial that learns
# nothing then trails every recorded trial there, and ASHA (keeping the better half) stops it for certain.
GRID = ["trainer.lr=choice(3e-3,1e-6)", "model.n_layer=choice(1,2)", "sweep.search=grid", "sweep.num_samples=1",
        "sweep.grace_period=4", "sweep.max_concurrent_trials=2"]


# --- expressions and checks, no trial runs ----------------------------------------------------------------
def test_hydra_sweep_expressions_become_a_tune_space():
    from ray.tune.search.sample import Categorical, Float, Integer

    fixed, swept = split_overrides(["experiment=smoke", "trainer.lr=tag(log,interval(1e-5,1e-3))",
                                    "model.n_layer=choice(2,4,6)", "trainer.micro_batch_size=range(8,33,8)",
                                    "model.n_embd=interval(32,128)"])
    assert fixed == ["experiment=smoke"]
    checked = plan(TINY + ["model.n_head=1", "trainer.lr=tag(log,interval(1e-5,1e-3))", "model.n_layer=choice(1,2)",
                           "model.n_embd=interval(32,128)"])[1]
    space = tune_space(checked.swept, "random")
    assert isinstance(space["trainer.lr"], Float) and space["trainer.lr"].lower == 1e-5
    assert type(space["trainer.lr"].get_sampler()).__name__.endswith("LogUniform")
    assert isinstance(space["model.n_embd"], Integer), "an interval over an integer key samples integers"
    assert isinstance(space["model.n_layer"], Categorical) and space["model.n_layer"].categories == [1, 2]
    by_key = {s.key: s for s in swept}
    assert by_key["trainer.micro_batch_size"].choices == [8, 16, 24, 32]
    grid = tune_space([by_key["model.n_layer"], by_key["trainer.micro_batch_size"]], "grid")
    assert grid["trainer.micro_batch_size"] == {"grid_search": [8, 16, 24, 32]}


def test_preset_expressions_merge_with_the_command_line():
    _, checked = plan(TINY + ["sweep=lr-asha", "model.n_layer=choice(1,2)"])
    assert checked.cfg.sweep.search == "random" and checked.cfg.sweep.num_samples == 8
    assert [s.key for s in checked.swept] == ["trainer.lr", "model.n_layer"]
    _, again = plan(TINY + ["sweep=lr-asha", "trainer.lr=choice(1e-3,2e-3)"])
    assert again.swept[0].choices == [1e-3, 2e-3], "the command line's expression replaces the preset's"


def test_the_best_command_composes_the_trials_config():
    values = {"trainer.lr": 0.0012345678901234, "model.n_layer": 1, "model": "gpt-tiny"}
    command = train_command(TINY + ["sweep.num_samples=3", "sweep=lr-asha"], values)
    assert command.startswith("lmforge train ") and "sweep" not in command
    rerun = load_config(shlex.split(command)[2:])
    trial = load_config(trial_overrides(TINY, values))
    assert rerun == trial and rerun.trainer.lr == 0.0012345678901234


@pytest.mark.parametrize("expression, named", [
    ("trainer.lr=choice(1e-3,", "trainer.lr=choice(1e-3,"),
    ("trainer.lr=tag(foo,interval(1e-4,1e-3))", "unknown tag 'foo'"),
    ("trainer.lr=tag(log,interval(0,1e-3))", "a log interval needs low > 0"),
    ("trainer.lrr=choice(1e-3,1e-2)", "unknown config key 'trainer.lrr'"),
    ("trainer.lr=choice(1e-3,-1)", "trainer.lr=-1"),
    ("sweep=nope", "sweep=nope: unknown sweep preset"),
])
def test_bad_input_is_one_line_naming_it_before_anything_starts(expression, named, capsys, lmforge_home):
    import ray

    assert cli.main(["sweep", *TINY, expression]) == 2
    err = capsys.readouterr().err
    assert named in err and err.startswith("lmforge: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not ray.is_initialized() and not (lmforge_home / "sweeps").exists(), "nothing may start"


def test_grid_over_an_interval_and_nothing_to_sweep_are_refused():
    with pytest.raises(LmforgeError, match="sweep.search=grid runs every combination"):
        plan(TINY + ["trainer.lr=interval(1e-4,1e-3)", "sweep.search=grid"])
    with pytest.raises(LmforgeError, match="nothing to sweep"):
        plan(TINY)


# --- real trials on a real local Ray cluster ---------------------------------------------------------------
@pytest.fixture
def local_ray(lmforge_home):
    """An embedded loopback cluster as `lmforge sweep` starts it (launcher.connect), sized for 2 concurrent
    trials of 2 workers: 5 CPUs on this 2-core machine, oversubscribed on purpose. Started by the test so it
    outlives the sweep and the test can inspect what the trials left behind."""
    import ray

    cfg = load_config(TINY)
    assert start_ray(cfg, None, {}, 2 * (2 * cfg.hardware.cpus_per_worker + cfg.sweep.driver_cpus))
    try:
        yield ray
    finally:
        ray.shutdown()


def child_runs(client: MlflowClient, parent_id: str):
    experiment = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'")


@pytest.mark.slow
def test_sweep_end_to_end_asha_mlflow_table_plots_and_best_command(local_ray, mlflow_server, lmforge_home):
    mlflow_server.start()
    tracking = [f"tracking.tracking_uri={mlflow_server.uri}"]
    summary = run_sweep(TINY + tracking + GRID)

    states = {t.values["trainer.lr"]: [] for t in summary.trials}
    for t in summary.trials:
        states[t.values["trainer.lr"]].append(t.state)
    assert len(summary.trials) == 4
    assert states[1e-6] == ["stopped early", "stopped early"], "ASHA stops the trials that learn nothing"
    assert "finished" in states[3e-3]
    assert all(t.step < 8 for t in summary.trials if t.state == "stopped early")

    # No leftovers: every trial's Train workers and placement group are gone while the cluster lives on,
    # including those of the trials ASHA stopped (their controller died with the trial's actor).
    import psutil
    from ray.util import placement_group_table

    workers = [a for a in local_ray._private.state.actors().values() if a["ActorClassName"] == "RayTrainWorker"]
    assert len(workers) >= 8, "each of the 4 trials ran 2 Train workers"
    deadline = time.time() + 60
    while time.time() < deadline:
        live_groups = [g for g in placement_group_table().values() if g["state"] != "REMOVED"]
        live_workers = [a for a in local_ray._private.state.actors().values()
                        if a["ActorClassName"] == "RayTrainWorker" and a["State"] != "DEAD"]
        if not live_groups and not live_workers:
            break
        time.sleep(1)
    assert not live_groups and not live_workers, (live_groups, live_workers)
    assert not [a for a in workers if a["Pid"] and psutil.pid_exists(a["Pid"])
                and "RayTrainWorker" in " ".join(psutil.Process(a["Pid"]).cmdline())]

    # MLflow: a parent with the best trial's tags and the results as artifacts, one child run per trial.
    client = MlflowClient(mlflow_server.uri)
    parent = client.get_run(summary.parent_run_id)
    best = summary.best
    assert best.state == "finished" and best.values["trainer.lr"] == 3e-3
    assert parent.data.tags["lmforge.best_trial"] == best.trial_id
    assert json.loads(parent.data.tags["lmforge.best_config"]) == best.values
    assert parent.data.metrics["best/val/loss"] == pytest.approx(best.metric)
    children = child_runs(client, summary.parent_run_id)
    assert sorted(c.data.tags["lmforge.sweep_trial"] for c in children) == sorted(t.trial_id for t in summary.trials)
    assert {c.info.status for c in children} == {"FINISHED"}
    artifacts = {f.path for f in client.list_artifacts(summary.parent_run_id, "sweep")}
    assert {"sweep/trials.csv", "sweep/trials.md", "sweep/val_loss_curves.png",
            "sweep/val_loss_vs_trainer.lr.png", "sweep/val_loss_vs_model.n_layer.png"} <= artifacts
    rows = (Path(summary.sweep_dir) / "trials.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("trial,state,step,val/loss")

    # The printed command reruns the best config to the same final training loss.
    from orchestrator.sweep_results import summary_lines

    lines = summary_lines(summary)
    assert lines[-1] == f"rerun best:  {summary.best_command}"
    argv = shlex.split(summary.best_command)
    assert argv[:2] == ["lmforge", "train"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", *argv[1:]], capture_output=True, text=True,
                         cwd=REPO, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rerun_id = next(line.split()[2] for line in out.stdout.splitlines() if line.startswith("mlflow run:"))
    rerun_loss = MlflowClient(mlflow_server.uri).get_metric_history(rerun_id, "train/loss")
    assert max(rerun_loss, key=lambda m: m.step).value == pytest.approx(best.train_loss, abs=1e-6), \
        "the rerun ends at the best trial's final training loss (as the trial reported it to Tune)"

    # Each child run holds its trial's own metric history, as a `lmforge train` run does.
    best_child = next(c for c in children if c.data.tags["lmforge.sweep_trial"] == best.trial_id)
    best_loss = MlflowClient(mlflow_server.uri).get_metric_history(best_child.info.run_id, "train/loss")
    assert best_loss and max(best_loss, key=lambda m: m.step).value == pytest.approx(best.train_loss, abs=1e-6)


@pytest.fixture
def crash_once(tmp_path, monkeypatch):
    """The first trial to save step 8 loses rank 0 after its upload, before the checkpoint is committed
    (checkpoint.crash_before_commit, once). Set before Ray starts: the local cluster's workers inherit it."""
    monkeypatch.setenv("LMFORGE_FAULT_BEFORE_COMMIT", f"8:{tmp_path / 'crashed'}")
    return tmp_path / "crashed"


@pytest.mark.slow
def test_a_crashed_trial_is_retried_from_its_checkpoint(crash_once, local_ray, lmforge_home):
    # trainer.max_failures=0 hands the crash to Tune, whose FailureConfig(max_failures=1) restarts the trial:
    # from its own newest checkpoint (step 4), in its own MLflow run, while the other trial runs on.
    summary = run_sweep(TINY + ["trainer.lr=choice(3e-3,2e-3)", "sweep.search=grid", "sweep.num_samples=1",
                                "sweep.scheduler=none", "sweep.max_concurrent_trials=2",
                                "trainer.max_failures=0", "sweep.max_failures=1"])
    assert crash_once.exists(), "the fault fired"
    assert [t.state for t in summary.trials] == ["finished", "finished"]
    restored = {t.trial_id: restored_steps(lmforge_home, t.mlflow_run_id) for t in summary.trials}
    assert sorted(restored.values()) == [[], [4]], "one trial restarted from its step-4 checkpoint, once"
    for t in summary.trials:
        assert max(losses(lmforge_home, t.mlflow_run_id)) == 8


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(lmforge_home):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"PYTHONPATH": str(REPO)}
    # Gradient accumulation slows each step, so the driver is likely killed between the trial's checkpoints.
    args = TINY + ["trainer.gradient_accumulation_steps=4", "trainer.lr=choice(3e-3,2e-3)", "sweep.search=grid",
                   "sweep.num_samples=1",
                   "sweep.scheduler=none", "sweep.max_concurrent_trials=1", "run_name=interrupted"]
    sweep_dir = lmforge_home / "sweeps" / "interrupted"
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "sweep", *args], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    runs = lmforge_home / "runs"
    second_started = None
    deadline = time.time() + 500
    # Kill the driver (and the cluster it started, in its process group) once the first trial finished and
    # the second has a checkpoint.
    while time.time() < deadline and driver.poll() is None:
        trial_dirs = sorted(runs.glob("interrupted-*")) if runs.exists() else []
        if len(trial_dirs) == 2 and (trial_dirs[1] / "checkpoint_00000004" / "lmforge_checkpoint.json").exists():
            second_started = trial_dirs
            break
        time.sleep(0.5)
    assert second_started, driver.communicate()[0][-3000:] if driver.poll() is not None else "timed out"
    kill_sweep(driver)
    first, second = second_started
    killed_at = step_of(latest_checkpoint(str(second)))
    first_marker = (first / "checkpoint_00000008" / "lmforge_checkpoint.json").stat().st_mtime_ns

    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", f"resume={sweep_dir}"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert (first / "checkpoint_00000008" / "lmforge_checkpoint.json").stat().st_mtime_ns == first_marker, \
        "the finished trial was not rerun"
    second_run = read_run_info(str(second))["mlflow_run_id"]
    if killed_at < 8:
        assert restored_steps(lmforge_home, second_run) == [killed_at], "the unfinished trial continued from " \
            "its newest checkpoint"
    assert max(metric_history(lmforge_home, second_run, "train/loss")) == 8
    assert "| finished |" in (sweep_dir / "trials.md").read_text().splitlines()[3], "both trials finished"
    assert "rerun best:  lmforge train" in out.stdout.splitlines()[-1]


def test_optuna_suggests_values_inside_the_swept_ranges():
    from ray.tune.search.optuna import OptunaSearch

    from orchestrator.sweep import tune_config

    _, checked = plan(TINY + ["sweep=width-optuna", "model.n_head=1"])
    search = tune_config(checked.cfg, concurrency=2).search_alg
    assert isinstance(search, OptunaSearch)
    assert search.set_search_properties("val/loss", "min", tune_space(checked.swept, "optuna"))
    for i in range(3):
        values = search.suggest(f"t{i}")
        assert 3e-4 <= values["trainer.lr"] <= 3e-2 and values["model.n_embd"] in (32, 64, 128)
        load_config(trial_overrides(TINY + ["model.n_head=1"], values))  # every suggestion is a valid config


def kill_sweep(driver: subprocess.Popen) -> None:
    """SIGKILL the sweep's driver, the cluster it started (its process group) and that cluster's workers
    (the raylet's children, in process groups of their own), all at once, as a machine that loses power."""
    import psutil

    group = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == driver.pid]
    raylets = {p.pid for p in group if "raylet" in " ".join(p.cmdline() if p.is_running() else [])}
    workers = [p for p in psutil.process_iter(["ppid"]) if p.info["ppid"] in raylets]
    os.killpg(driver.pid, signal.SIGKILL)
    for worker in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()
    driver.wait()


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None
