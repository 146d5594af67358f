"""The driver asks Ray Train for no helper actor the job does not use, and joins a named cluster the way
cluster/start-head.sh starts one: token authentication on, loopback when the head is on loopback."""

import os

import pytest
import ray
from ray._private import ray_constants
from ray._raylet import Config
from ray.train import RunConfig, ScalingConfig

from orchestrator.config import load_config
from orchestrator.launcher import connect, trainer_class


def callback_names(embedded: bool, tmp_path) -> list[str]:
    trainer = trainer_class(embedded)(lambda config: None, scaling_config=ScalingConfig(num_workers=2),
                                      run_config=RunConfig(name="callbacks", storage_path=str(tmp_path)))
    return [type(callback).__name__ for callback in trainer._create_default_callbacks()]


def test_embedded_cluster_runs_without_dataset_manager_or_placement_group_cleaner(tmp_path):
    # These names are Ray Train's own; if a Ray upgrade renames them this fails, rather than the two helper
    # processes quietly coming back.
    names = callback_names(embedded=True, tmp_path=tmp_path)
    assert "BackendSetupCallback" in names  # the torch process group is still set up
    assert "DatasetsCallback" not in names
    assert "PlacementGroupCleanerCallback" not in names


def test_shared_cluster_keeps_the_placement_group_cleaner(tmp_path):
    # On a cluster that outlives this driver, a dead controller's placement group must still be removed.
    names = callback_names(embedded=False, tmp_path=tmp_path)
    assert "PlacementGroupCleanerCallback" in names
    assert "DatasetsCallback" not in names


@pytest.fixture
def joined(monkeypatch):
    """connect() to a named address, with ray.init recorded instead of run; Ray's settings restored after."""
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        monkeypatch.setenv(name, "restored after the test")
        monkeypatch.delenv(name)

    def join(address: str, **env: str) -> dict:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert connect(address, load_config([]), {}) is False
        return calls[-1]

    yield join
    monkeypatch.undo()
    Config.initialize("")  # back to the test process's own RAY_AUTH_MODE


def test_a_named_cluster_is_joined_with_token_auth_when_a_token_is_set(joined):
    """Ray turns token mode on by itself only for a cluster it finds, and a head from start-head.sh needs it."""
    joined("10.0.0.5:6379", RAY_AUTH_TOKEN="s3cret")
    assert os.environ["RAY_AUTH_MODE"] == "token"
    joined("10.0.0.5:6379", RAY_AUTH_MODE="disabled")
    assert os.environ["RAY_AUTH_MODE"] == "disabled", "a mode the user set is kept"


@pytest.mark.parametrize("address", ["127.0.0.1:6379", "localhost:6379", "ray://127.0.0.1:10001"])
def test_a_head_on_loopback_is_dialled_on_loopback(joined, address):
    """Ray otherwise dials this machine's routable address for 127.0.0.1, where a loopback head is not."""
    joined("10.0.0.5:6379")
    assert ray_constants.ENABLE_RAY_CLUSTER is True, "a remote head is dialled as named"
    assert joined(address)["address"] == address
    assert ray_constants.ENABLE_RAY_CLUSTER is False
