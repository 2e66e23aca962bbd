import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))   # the test modules share fixtures by importing test_node

from spatialthinker_ros.harness import FramePublisher, Processes, new_context  # noqa: E402


@pytest.fixture
def ros_context():
    context = new_context()
    yield context
    context.try_shutdown()


@pytest.fixture
def spawn(tmp_path):
    """Start child processes; every one is stopped by its own pid at teardown."""
    with Processes(tmp_path) as processes:
        yield processes.start


@pytest.fixture
def frames(ros_context):
    publisher = FramePublisher(ros_context)
    yield publisher
    publisher.close()
