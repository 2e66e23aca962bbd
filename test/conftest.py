"""Suite-wide isolation: ROS discovery stays on this machine, on a domain of our own, logging to a temp dir.

This runs before any test module imports rclpy, so every node this suite starts (in-process or as a child
process, which inherits os.environ) is isolated.
"""

import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["ROS_DOMAIN_ID"] = str(random.SystemRandom().randint(1, 100))
_LOG_DIR = tempfile.mkdtemp(prefix="spatialthinker-test-roslog-")
os.environ["ROS_LOG_DIR"] = _LOG_DIR
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AMENT_PREFIX_PATH", sys.prefix)   # the venv is the ROS prefix (make test exports it too)
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Camera frames over 512 KB are lost or stall for seconds with stock Fast DDS transports (config file explains).
os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(Path(__file__).resolve().parents[1] / "config" /
                                                  "fastdds_large_images.xml")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_LOG_DIR, ignore_errors=True)


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
