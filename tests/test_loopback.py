"""A default `lmforge train` opens no port beyond this machine: its processes listen on loopback only."""

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}

pytestmark = pytest.mark.slow


def listeners(root: psutil.Process) -> dict[tuple[str, int], str]:
    """(address, port) -> process name of every TCP socket that `root` or a descendant listens on."""
    tree = {root.pid: root.name()}
    for child in root.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # a process that ended while we looked
            tree[child.pid] = child.name()
    return {(c.laddr.ip, c.laddr.port): tree[c.pid] for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in tree}


@pytest.fixture(scope="module")
def listening(tmp_path_factory) -> dict[tuple[str, int], str]:
    """Every listening socket seen while `lmforge train` (with the Ray dashboard on) ran, sampled every 0.3 s."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "LMFORGE_"))}
    env["LMFORGE_HOME"] = str(tmp_path_factory.mktemp("home"))
    run = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "train", "experiment=smoke", "trainer.max_steps=3",
         "hardware.ray_dashboard=true"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    driver, seen = psutil.Process(run.pid), {}
    try:
        while run.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):  # the run ended while we looked
                seen |= listeners(driver)
            time.sleep(0.3)
        _, stderr = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 0, stderr[-3000:]
    names = set(seen.values())
    # Sampled while the cluster ran: its core processes and the training workers were seen listening.
    assert {"gcs_server", "raylet"} <= names, seen
    assert any("RayTrainWorker" in name for name in names), seen
    return seen


def exposed(seen: dict[tuple[str, int], str]) -> list[str]:
    return sorted(f"{name} on {ip}:{port}" for (ip, port), name in seen.items() if ip not in LOOPBACK)


def test_nothing_of_a_training_run_listens_beyond_loopback(listening):
    """GCS, raylet, object manager, driver, workers, agents, dashboard, the Prometheus endpoints, and the
    training workers' own sockets: rank 0's torch.distributed store and gloo's connections."""
    assert any("RayTrainWorker" in name for name in listening.values()), "no training worker was sampled"
    assert exposed(listening) == []
