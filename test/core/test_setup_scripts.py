"""The checks `make setup` runs before it installs anything."""

from __future__ import annotations

import subprocess
from pathlib import Path

CHECK_FREE_DISK = Path(__file__).resolve().parents[2] / "scripts" / "check_free_disk.sh"


def check_free_disk(need_gb: int, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHECK_FREE_DISK), ".venv", str(need_gb)], cwd=cwd, capture_output=True, text=True,
                          timeout=30)


def test_setup_stops_at_once_when_the_venv_would_not_fit(tmp_path):
    done = check_free_disk(10**9, tmp_path)
    assert done.returncode == 1
    assert "needs about 1000000000 GB of disk" in done.stderr and "GB are free here" in done.stderr, done.stderr


def test_setup_goes_on_when_it_fits(tmp_path):
    done = check_free_disk(0, tmp_path)
    assert done.returncode == 0 and done.stderr == "", done.stderr
