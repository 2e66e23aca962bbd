"""A test run killed with SIGTERM (a `kill`, CI's `timeout`) still stops the children its tests started: they have
sessions of their own, so nothing else would (testing/processes.stop_on_sigterm, installed by test/conftest.py)."""

import contextlib
import os
import signal
import sys
from pathlib import Path

import psutil
import pytest

from spatialthinker_ros.testing.processes import Processes, wait_for

WAIT_S = 60.0
# Run under the suite's own conftest: starts a sleeper through Processes, says its pid, then waits to be killed
INNER_TEST = """
import sys, time
from pathlib import Path
from spatialthinker_ros.testing.processes import Processes

def test_waits_to_be_killed(tmp_path):
    with Processes(tmp_path) as children:
        sleeper = children.start([sys.executable, "-c", "import time; time.sleep(600)"], name="sleeper")
        Path({pid_file!r}).write_text(str(sleeper.pid))
        time.sleep(600)
"""


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.timeout(3 * WAIT_S)
def test_a_run_killed_with_sigterm_stops_the_children_its_tests_started(tmp_path):
    pid_file = tmp_path / "sleeper.pid"
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "test_inner.py").write_text(INNER_TEST.format(pid_file=str(pid_file)))
    suite = Path(__file__).resolve().parents[1]   # test/: its conftest is loaded as a plugin by name
    command = [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "--rootdir", str(inner),
               "-c", "/dev/null", str(inner / "test_inner.py")]
    with Processes(tmp_path) as processes:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(suite), os.environ.get("PYTHONPATH")]))}
        run = processes.start(command, name="inner-pytest", env=env)
        wait_for(lambda: pid_file.exists() and pid_file.read_text(), WAIT_S, "the inner test's sleeper", run)
        sleeper = psutil.Process(int(pid_file.read_text()))   # psutil refuses a kill once the pid is reused
        try:
            run.popen.send_signal(signal.SIGTERM)
            run.popen.wait(timeout=WAIT_S)
            assert gone(sleeper), f"the sleeper (pid {sleeper.pid}) outlived its killed run:\n{run.describe()}"
            assert "KeyboardInterrupt" in run.output(), run.describe()
        finally:
            with contextlib.suppress(psutil.NoSuchProcess):   # our own sleeper, if it outlived the run
                sleeper.kill()
