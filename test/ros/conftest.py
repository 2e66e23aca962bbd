"""The ROS tests' fixtures: a context, child processes stopped by pid, cameras, the node's client."""

import contextlib
import json

import pytest
from node_requests import QUESTION, RESPONSE

from spatialthinker_ros.testing.fake_cameras import FakeCamera, FramePublisher
from spatialthinker_ros.testing.node_client import NodeClient, new_context
from spatialthinker_ros.testing.processes import Processes


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
    with contextlib.closing(FramePublisher(ros_context)) as publisher:
        yield publisher


@pytest.fixture
def replay_file(tmp_path):
    """Replay lines: QUESTION answered with RESPONSE (option probabilities 0.8 and 0.2), and "broken?" with a
    truncated answer."""
    path = tmp_path / "replay.jsonl"
    path.write_text(json.dumps({"question": QUESTION, "response": RESPONSE, "option_probabilities": [0.8, 0.2]})
                    + "\n"
                    + json.dumps({"question": "broken?", "response": "<observe>a cup</observe><scene>{'objects': "
                                "[{'id': 'cup.1', 'bbox': [10, 20, 30, 40]}, {'id': 'pl"}) + "\n")
    return path


@pytest.fixture
def client(ros_context):
    c = NodeClient(ros_context)
    yield c
    c.close()


@pytest.fixture
def camera(ros_context):
    """Makes FakeCameras (FakeCamera's arguments); all closed at teardown."""
    streamers = []

    def _camera(**kwargs):
        streamers.append(FakeCamera(ros_context, **kwargs))
        return streamers[-1]

    yield _camera
    for s in streamers:
        s.close()
