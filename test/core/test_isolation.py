"""Test isolation: concurrent suites on one host never share a ROS domain (testing/isolation.allocate_domain_id)."""

import subprocess
import sys

import pytest

from spatialthinker_ros.testing.isolation import allocate_domain_id

WAIT_S = 60.0
# Allocates from two ids with the given lock folder, prints the id (or the error), then holds it until stdin closes
HOLDER = """
import sys
from pathlib import Path
from spatialthinker_ros.testing.isolation import allocate_domain_id
try:
    print(allocate_domain_id((1, 2), Path(sys.argv[1])), flush=True)
except RuntimeError as exc:
    print(f"error: {exc}", flush=True)
sys.stdin.read()
"""


def holder(lock_dir) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def first_line(process: subprocess.Popen) -> str:
    return process.stdout.readline().strip()   # bounded by the test's timeout


@pytest.mark.timeout(WAIT_S)
def test_processes_allocating_at_once_get_different_domains_until_one_exits(tmp_path):
    """Two ids, two processes started together: one each; a third finds none free; an exited one's id is free."""
    processes = [holder(tmp_path), holder(tmp_path)]
    try:
        ids = [first_line(p) for p in processes]
        assert sorted(ids) == ["1", "2"], ids
        third = holder(tmp_path)
        processes.append(third)
        assert first_line(third).startswith("error: every ROS domain in 1..2 is held")
        processes[0].communicate(timeout=WAIT_S)   # it exits: the kernel releases its lock
        fourth = holder(tmp_path)
        processes.append(fourth)
        assert first_line(fourth) == ids[0]
    finally:
        for process in processes:
            if process.poll() is None:
                process.communicate(timeout=WAIT_S)


def test_this_process_holds_its_domain(tmp_path):
    taken = allocate_domain_id((7,), tmp_path)
    assert taken == 7
    with pytest.raises(RuntimeError, match="every ROS domain in 7..7 is held"):
        allocate_domain_id((7,), tmp_path)   # a second descriptor of this process is refused too (flock)
