"""`lmforge ui`: the MLflow UI for the configured store, on 127.0.0.1 unless told otherwise, printing its URL
and stopping cleanly on Ctrl-C."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
from run_helpers import free_port, wait_serving

ROOT = Path(__file__).resolve().parents[1]


def start_ui(tmp_path, *args):
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", *args, f"paths.root={tmp_path}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal's foreground job


def listening_addresses(pid: int) -> set[str]:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return {c.laddr.ip for p in procs for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


def test_ui_serves_the_local_store_on_loopback_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    proc = start_ui(tmp_path, "--port", str(port))
    try:
        assert wait_serving(f"http://127.0.0.1:{port}", proc, 90), "the MLflow UI never answered"
        assert listening_addresses(proc.pid) == {"127.0.0.1"}
        # The store is the one `lmforge train` writes under paths.root.
        assert (tmp_path / "mlflow.db").is_file()
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}" in out and f"sqlite:///{tmp_path}/mlflow.db" in out
    assert "Traceback" not in err and "warning" not in err


def test_ui_on_another_interface_warns_that_it_has_no_authentication(tmp_path):
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: the server cannot bind it and exits, so nothing
    # listens beyond loopback even for this test.
    proc = start_ui(tmp_path, "--host", "192.0.2.1", "--port", str(free_port()))
    try:
        warning = proc.stderr.readline()  # printed before the server starts
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=30)
    assert "reachable from other machines and has no authentication" in warning and "basic-auth" in warning
