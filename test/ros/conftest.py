import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from rosutil import FramePublisher, Process, new_context  # noqa: E402


@pytest.fixture
def ros_context():
    context = new_context()
    yield context
    context.try_shutdown()


@pytest.fixture
def spawn(tmp_path):
    """Start child processes; every one is stopped by its own pid at teardown."""
    started: list[Process] = []

    def _spawn(args, name="proc", env=None) -> Process:
        proc = Process(args, tmp_path / f"{name}-{len(started)}.log", env=env)
        started.append(proc)
        return proc

    yield _spawn
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def frames(ros_context):
    publisher = FramePublisher(ros_context)
    yield publisher
    publisher.close()
