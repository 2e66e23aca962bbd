"""The checks `make setup` runs before it installs anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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


REPO = Path(__file__).resolve().parents[2]


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "-C", str(REPO), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("target, distro, setup", [("demo", "jazzy", "make setup"), ("test", "jazzy", "make setup"),
                                                   ("build", "kilted", "make setup ROS_DISTRO=kilted")])
def test_targets_before_setup_say_run_setup_first_in_one_line(target, distro, setup, tmp_path):
    done = make(target, f"ROS_DISTRO={distro}", f"VENV={tmp_path / 'venv'}", f"BUILD={tmp_path / 'build'}")
    assert done.returncode != 0
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and f"run `{setup}` first" in lines[0], lines
    assert not (tmp_path / "build").exists(), "nothing was built"


@pytest.mark.parametrize("distro, demo", [("jazzy", "make demo"), ("kilted", "make demo ROS_DISTRO=kilted")])
def test_setup_says_what_it_builds_and_ends_with_the_next_command(distro, demo):
    venv = Path(sys.executable).parents[1]    # set up: the dry run goes through the build's commands too
    done = make("-n", "setup", f"ROS_DISTRO={distro}", f"VENV={venv}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert any("setup: building the message, service and action interfaces" in line for line in lines), lines
    assert "cmake --install" in done.stdout
    assert f"setup: done. Next: `{demo}`" in lines[-1] and '"Without a GPU or a camera" in README.md' in lines[-1], lines[-1]
    assert "### Without a GPU or a camera" in (REPO / "README.md").read_text()
