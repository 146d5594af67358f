"""Shared fixtures: every test writes under its own output root and runs offline."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def lmforge_home(tmp_path, monkeypatch):
    root = tmp_path / "lmforge_home"
    monkeypatch.setenv("LMFORGE_HOME", str(root))
    return root


@pytest.fixture
def one_thread():
    """One torch thread: the machine's cores are shared with other test runs, and more threads only contend."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on a free 127.0.0.1 port (tests/mlflow_server.py); call .start() to run it."""
    from mlflow_server import MlflowServer

    server = MlflowServer(tmp_path)
    try:
        yield server
    finally:
        server.kill()
