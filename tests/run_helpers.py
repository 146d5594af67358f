"""Reading a training run's per-step history back from its MLflow run."""

from mlflow.tracking import MlflowClient

from orchestrator.config import load_config
from orchestrator.tracking import tracking_uri


def _client(home) -> MlflowClient:
    return MlflowClient(tracking_uri(load_config([f"paths.root={home}"]).tracking, str(home)))


def losses(home, run_id) -> dict[int, float]:
    """Per-step training loss; after a restart a step is logged twice and the later value counts."""
    history = sorted(_client(home).get_metric_history(run_id, "train/loss"), key=lambda m: m.timestamp)
    return {m.step: m.value for m in history}


def restored_steps(home, run_id) -> list[int]:
    return [int(m.value) for m in _client(home).get_metric_history(run_id, "checkpoint/restored_step")]


def run_status(home, run_id) -> str:
    return _client(home).get_run(run_id).info.status


def assert_same_losses(home, expected_run_id, actual_run_id, steps) -> None:
    """The runs logged the same per-step training loss at every one of `steps`, to 1e-6."""
    import numpy as np

    expected, actual = losses(home, expected_run_id), losses(home, actual_run_id)
    np.testing.assert_allclose([actual[s] for s in steps], [expected[s] for s in steps], rtol=0, atol=1e-6)


def free_port() -> int:
    """A loopback port nothing listens on (free when this returns)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_train_workers() -> list:
    """The Ray Train worker processes on this machine (psutil.Process), to kill from outside."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "RayTrainWorker" in cmdline and "ray::" in cmdline:
            found.append(proc)
    return found


def metric_history(home, run_id, key: str) -> dict[int, float]:
    """A metric's value per step; after a restart the later value counts."""
    history = sorted(_client(home).get_metric_history(run_id, key), key=lambda m: m.timestamp)
    return {m.step: m.value for m in history}


def run_killing_a_worker(start, run_dir: str, checkpoint: str = "checkpoint_00000008"):
    """Run `start()` (a training run writing into `run_dir`) in a thread; once `checkpoint` is complete,
    SIGKILL a Ray Train worker from outside, as a crash or the OOM killer would. Returns start()'s result."""
    import os
    import signal
    import threading
    import time

    from orchestrator.checkpoint import is_complete

    outcome = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("result", start()))
    runner.start()
    deadline, path = time.time() + 240, f"{run_dir}/{checkpoint}"
    while not (os.path.isdir(path) and is_complete(path)):
        assert time.time() < deadline and runner.is_alive(), f"run never reached {checkpoint}"
        time.sleep(0.1)
    victims = ray_train_workers()
    assert victims, "no Ray Train worker process found"
    os.kill(victims[-1].pid, signal.SIGKILL)
    runner.join(timeout=400)
    return outcome["result"]


def wait_serving(url: str, proc, seconds: float) -> bool:
    """Poll `url`/health until it answers 200 (True), `proc` exits or `seconds` pass (False)."""
    import time
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.25)
    return False
