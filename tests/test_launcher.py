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


def test_workers_of_a_joined_cluster_get_the_login_from_the_object_store_not_the_config(tmp_path, monkeypatch):
    """Ray Train exports train_loop_config into its run state (the dashboard shows it), so the MLflow login
    reaches workers that do not inherit the driver's environment as an object-store reference."""
    import json

    from orchestrator.credentials import apply_credentials
    from orchestrator.launcher import make_trainer

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        # Set after Ray started: its worker processes do not have them, as on a cluster joined by address.
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "trainer")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-password-123")
        cfg = load_config(["experiment=smoke", f"paths.root={tmp_path}"])
        loop = make_trainer(cfg, {}, False, "prepared", None, f"{tmp_path}/runs/r", None, {}).train_loop_config
        assert isinstance(loop["credentials"], ray.ObjectRef)
        assert "s3cret-password-123" not in json.dumps(loop, default=str)

        @ray.remote
        def signed_in(loop_config):  # nested in a dict, as in train_loop_config: Ray passes the reference
            before = os.environ.get("MLFLOW_TRACKING_PASSWORD")
            apply_credentials(ray.get(loop_config["credentials"]))
            return before, os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")

        assert ray.get(signed_in.remote({"credentials": loop["credentials"]})) == (None, "trainer",
                                                                                   "s3cret-password-123")
        embedded = make_trainer(cfg, {}, True, "prepared", None, f"{tmp_path}/runs/r", None, {})
        assert embedded.train_loop_config["credentials"] is None  # its workers inherit this environment
    finally:
        ray.shutdown()
