"""cluster/: the launcher YAMLs validate against Ray's own cluster-launcher schema, the KubeRay manifests carry
what KubeRay and lmforge need, and every definition installs lmforge the way the README does."""

import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
LAUNCHER = ["aws.yaml", "gcp.yaml"]
# The fields KubeRay's CRDs require (ray.io/v1 RayCluster and RayJob), plus what lmforge relies on.
KUBERAY_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"enum": ["RayCluster", "RayJob"]},
        "metadata": {"type": "object", "required": ["name"]},
    },
}
CLUSTER_SPEC_SCHEMA = {
    "type": "object",
    "required": ["headGroupSpec", "workerGroupSpecs"],
    "properties": {
        "headGroupSpec": {"type": "object", "required": ["rayStartParams", "template"]},
        "workerGroupSpecs": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["groupName", "rayStartParams", "template"]}},
    },
}


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_yaml_validates_against_rays_schema(name):
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(load(name), schema)


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_yaml_has_a_cpu_head_and_8_gpu_h100_and_a100_workers_with_token_auth(name):
    cfg = load(name)
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpu_types = {t: spec for t, spec in types.items() if spec["resources"].get("GPU") == 8}
    assert {"gpu_8xh100", "gpu_8xa100"} <= set(gpu_types)
    start = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    # The nodes start through the scripts that refuse to run without a token; the token travels as a file.
    assert "cluster/start-head.sh" in start and "cluster/start-worker.sh" in start
    assert "RAY_AUTH_TOKEN=$(cat ~/.ray/auth_token)" in start
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert not re.search(r"RAY_AUTH_TOKEN=[0-9a-f]{16,}", (CLUSTER / name).read_text()), "a literal token"


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_setup_is_the_readme_setup(name):
    readme = (CLUSTER.parent / "README.md").read_text()
    makefile = (CLUSTER.parent / "Makefile").read_text()
    assert "make train" in readme and "setup: $(STAMP)" in makefile  # the README's set-up is make's venv
    assert load(name)["setup_commands"] == ["cd ~/lmforge && make setup"]


@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_kuberay_manifests_have_required_fields_token_secret_and_bucket(name):
    doc = load(name)
    jsonschema.validate(doc, KUBERAY_SCHEMA)
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    jsonschema.validate(spec, CLUSTER_SPEC_SCHEMA)
    if doc["kind"] == "RayJob":
        assert doc["spec"]["entrypoint"].startswith("lmforge train ")
        assert "checkpoint.storage=$LMFORGE_CHECKPOINT_BUCKET" in doc["spec"]["entrypoint"]
    groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "lmforge-ray-token"
            assert env["LMFORGE_CHECKPOINT_BUCKET"]["value"].startswith("s3://")
    assert any(c["resources"]["limits"].get("nvidia.com/gpu") == "8"
               for g in spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])
