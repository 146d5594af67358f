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
