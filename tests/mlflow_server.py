"""A real `mlflow server` process on 127.0.0.1 for tests: start, SIGKILL, restart on the same port and store."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from run_helpers import free_port, wait_serving


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 that a test can SIGKILL and bring back on the same port and store."""

    def __init__(self, tmp_path: Path, extra_args: tuple[str, ...] = (), env: dict | None = None):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.dir = tmp_path / "server"
        self.dir.mkdir()
        self.extra_args, self.env = list(extra_args), env or {}
        self.proc = None

    def start(self, timeout_s: float = 90.0) -> None:  # generous: a loaded 2-core box needs ~25 s
        log_file = open(self.dir / "server.log", "ab")  # noqa: SIM115 - the child keeps writing to it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.dir / 'mlflow.db'}",
             "--artifacts-destination", str(self.dir / "artifacts"), *self.extra_args],
            cwd=self.dir, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"} | self.env)  # one process less to start
        log_file.close()
        if wait_serving(self.uri, self.proc, timeout_s):
            return
        log_tail = (self.dir / "server.log").read_text()[-2000:]
        self.kill()
        pytest.fail(f"mlflow server did not come up on {self.uri}:\n{log_tail}")

    def kill(self) -> None:
        # start_new_session made the server the leader of its own group: this takes its uvicorn workers too.
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None
