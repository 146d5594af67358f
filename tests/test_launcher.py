"""The driver asks Ray Train for no helper actor the job does not use; each would share the workers' cores."""

from ray.train import RunConfig, ScalingConfig

from orchestrator.launcher import trainer_class


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
