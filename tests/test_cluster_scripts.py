"""cluster/start-head.sh and start-worker.sh: token authentication always, loopback unless an address is named."""

import os
import subprocess
from pathlib import Path

import pytest

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
# Records how it was called instead of starting Ray.
FAKE_RAY = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$RECORD.args"
env > "$RECORD.env"
"""


def start(script: str, *args: str, tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list, dict]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "ray").write_text(FAKE_RAY)
    (bin_dir / "ray").chmod(0o755)
    record = tmp_path / "ray"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "LMFORGE_"))}
    out = subprocess.run([str(CLUSTER / script), *args], capture_output=True, text=True, timeout=30,
                         env=base | {"PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record)} | env)
    if not Path(f"{record}.args").exists():
        return out, [], {}
    called = Path(f"{record}.args").read_text().splitlines()
    ray_env = dict(line.split("=", 1) for line in Path(f"{record}.env").read_text().splitlines() if "=" in line)
    return out, called, ray_env


@pytest.mark.parametrize("script,args", [("start-head.sh", []), ("start-worker.sh", ["10.0.0.5:6379"])])
@pytest.mark.parametrize("token", [None, ""])
def test_scripts_refuse_to_start_without_a_token(tmp_path, script, args, token):
    env = {} if token is None else {"RAY_AUTH_TOKEN": token}
    out, called, _ = start(script, *args, tmp_path=tmp_path, **env)
    assert out.returncode != 0
    assert not called, "ray start must not run"
    assert "RAY_AUTH_TOKEN" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize("script,args", [("start-head.sh", []), ("start-worker.sh", ["10.0.0.5:6379"])])
def test_scripts_turn_token_auth_on_even_when_the_environment_turned_it_off(tmp_path, script, args):
    out, called, env = start(script, *args, tmp_path=tmp_path, RAY_AUTH_TOKEN="s3cret", RAY_AUTH_MODE="disabled")
    assert out.returncode == 0, out.stderr
    assert called[0] == "start"
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == "s3cret"


def test_head_listens_on_loopback_unless_told_otherwise(tmp_path):
    out, called, env = start("start-head.sh", "--num-cpus=4", tmp_path=tmp_path, RAY_AUTH_TOKEN="s3cret")
    assert out.returncode == 0, out.stderr
    # Ray resolves --node-ip-address=127.0.0.1 to the routable address; its local-only mode keeps loopback.
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert not any(a.startswith("--node-ip-address") for a in called)
    assert "--dashboard-host=127.0.0.1" in called and "--num-cpus=4" in called
    assert "127.0.0.1 only" in out.stderr


@pytest.mark.parametrize("how", [["--node-ip-address=10.0.0.5"], ["--node-ip-address", "10.0.0.5"], []])
def test_head_on_a_named_address_says_it_is_reachable_from_that_network(tmp_path, how):
    extra = {} if how else {"LMFORGE_HEAD_IP": "10.0.0.5"}
    out, called, env = start("start-head.sh", *how, tmp_path=tmp_path, RAY_AUTH_TOKEN="s3cret", **extra)
    assert out.returncode == 0, out.stderr
    assert "--node-ip-address=10.0.0.5" in called
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in env
    assert "reachable from the network of 10.0.0.5" in out.stderr
    assert "--dashboard-host=127.0.0.1" in called


def test_worker_joins_the_named_head(tmp_path):
    out, called, _ = start("start-worker.sh", "10.0.0.5:6379", "--num-gpus=8", tmp_path=tmp_path,
                           RAY_AUTH_TOKEN="s3cret")
    assert out.returncode == 0, out.stderr
    assert called == ["start", "--address=10.0.0.5:6379", "--num-gpus=8"]
