"""A rank killed mid-save leaves its local staging copy behind; the next workers on that node remove it."""

import os
import subprocess
import sys

from orchestrator import checkpoint


def test_staging_left_by_a_dead_rank_is_removed_and_live_ones_kept(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    orphan = tmp_path / f"{checkpoint.STAGING_PREFIX}{dead}-abc123"
    (orphan / "ds").mkdir(parents=True)
    (orphan / "ds" / "shard.pt").write_bytes(b"x" * 1024)
    unrelated = tmp_path / "lmforge-ckpt-notapid"
    unrelated.mkdir()

    with checkpoint.staging_dir() as live:
        assert os.path.basename(live).startswith(f"{checkpoint.STAGING_PREFIX}{os.getpid()}-")
        removed = checkpoint.remove_orphaned_staging(str(tmp_path))
        assert os.path.isdir(live), "a running rank's staging directory must survive"

    assert removed == [str(orphan)]
    assert not orphan.exists()
    assert unrelated.is_dir()
