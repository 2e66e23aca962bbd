"""Suite-wide isolation: ROS discovery stays on this machine, on a domain of our own, logging to a temp dir.

This runs before any test module imports rclpy, so every node this suite starts (in-process or as a child
process, which inherits os.environ) is isolated.
"""

import shutil
from pathlib import Path

import pytest

import hypothesis_profiles  # noqa: F401  (registers and loads the hypothesis profile before any test module)
from spatialthinker_ros.testing.isolation import isolate_ros
from spatialthinker_ros.testing.processes import stop_on_sigterm

# before any test module imports rclpy: every node of the suite, in-process or a child (which inherits os.environ)
_SCRATCH = isolate_ros(prefix="spatialthinker-test-")
stop_on_sigterm()   # a killed run still stops the nodes, cameras and servers its fixtures started


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SCRATCH, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL checkpoint, built offline once per session (answers are noise)."""
    from spatialthinker_ros.tiny_checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen25vl"))


@pytest.fixture(scope="session")
def heavy_tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny checkpoint with ~100 MB of MLP weights: big enough to see in a process's memory."""
    from spatialthinker_ros.tiny_checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("heavy-tiny-qwen25vl"), mlp_width=65536)


@pytest.fixture(scope="session")
def tiny_server(tiny_checkpoint: Path, tmp_path_factory) -> str:
    """A real `transformers serve` of the tiny checkpoint on 127.0.0.1, once per session; yields its /v1 URL.
    Requests must name the model as str(tiny_checkpoint)."""
    from transformers_serve import TransformersServe

    server = TransformersServe(tiny_checkpoint, tmp_path_factory.mktemp("tiny-serve"))
    try:
        yield server.start()
    finally:
        server.stop()
