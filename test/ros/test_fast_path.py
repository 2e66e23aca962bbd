"""Fast-path behaviour of the real node that the benchmarks rely on (bench/README.md): camera frames are decoded
only when a request uses one, never on arrival, and the buffers of frames it lets go are reused, not re-mapped."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from spatialthinker_ros.testing.node_client import spin_until
from spatialthinker_ros.testing.processes import node_command
from sensor_msgs.msg import CompressedImage
from node_requests import CALL, E, OPTIONS, QUESTION, replay_params

pytestmark = pytest.mark.timeout(120)

# Starts and ends like a JPEG (so the O(1) check on arrival passes) but holds no image: only decoding can tell.
UNDECODABLE_JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8 + b"\xff\xd9"


def test_frames_are_decoded_only_when_a_request_uses_one(spawn, client, frames, replay_file):
    proc = spawn(node_command(**replay_params(replay_file, image_transport="compressed", use_depth=False,
                                           max_image_age=0.0)), name="node")
    frames.set("image/compressed", CompressedImage,
               lambda header: CompressedImage(header=header, format="jpeg", data=UNDECODABLE_JPEG))
    client.wait_for_service(proc)
    assert spin_until(client.node, lambda: client.node.count_subscribers("/image/compressed") > 0, CALL)
    sent = frames.published["image/compressed"]
    assert spin_until(client.node, lambda: frames.published["image/compressed"] >= sent + 60, CALL)
    response = client.ask(question=QUESTION, options=OPTIONS)
    assert response.error_code == E.ERROR_NO_IMAGE and "could not be decoded" in response.message, response.message
    # the node's counters, published after that reply: dozens of frames arrived, one was decoded
    assert spin_until(client.node, lambda: client.stats, CALL), "no ~/stats after the reply"
    camera = client.stats[-1]["cameras"]["default"]
    assert camera["frames_received"] >= 30, f"frames reached the node: {camera}"
    assert camera["frames_decoded"] <= 1, "a frame was decoded on arrival, before any request"
    assert camera["frames_decoded"] == 1, "only the frame the request used was decoded"


def minor_page_faults(pid: int) -> int:
    """minflt of /proc/PID/stat (field 10; the command name in parentheses may hold spaces)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def test_an_idle_node_streamed_raw_1080p_with_depth_reuses_the_memory_of_old_frames(spawn, client, camera,
                                                                                     replay_file):
    # With glibc's defaults this node took ~270 page faults per frame (~8,000/s at 30 Hz): the 4-6 MB buffers of
    # the frames it let go were returned to the OS and mapped again for the next ones.
    cam = camera(width=1920, height=1080, rate_hz=15.0, depth_m=np.full((1080, 1920), 2.0, np.float32),
                 depth_encoding="16UC1")
    proc = spawn(node_command(**replay_params(replay_file)), name="node")
    response = client.ask_until_ready(proc, with_depth=True, question=QUESTION, options=OPTIONS)
    assert response.success, response.message
    ready = len(cam.published_stamps)   # frame rings full: from here on each frame replaces one
    assert spin_until(client.node, lambda: len(cam.published_stamps) >= ready + 30, CALL)
    assert spin_until(client.node, lambda: client.stats, CALL), "no ~/stats after the reply"
    received_before, published_before = client.stats[-1]["cameras"]["default"]["frames_received"], ready
    per_frame = []   # per window of 15 frames
    for _ in range(10):
        faults, published = minor_page_faults(proc.pid), len(cam.published_stamps)
        assert spin_until(client.node, lambda: len(cam.published_stamps) >= published + 15, CALL)
        per_frame.append((minor_page_faults(proc.pid) - faults) / max(1, len(cam.published_stamps) - published))
    replies = len(client.stats)
    response = client.ask(question=QUESTION, options=OPTIONS, max_image_age=0.5)
    assert response.success, f"the node stopped receiving frames: {response.message}"
    assert spin_until(client.node, lambda: len(client.stats) > replies, CALL), "no ~/stats after the reply"
    received = client.stats[-1]["cameras"]["default"]["frames_received"] - received_before
    published = len(cam.published_stamps) - published_before
    assert received >= published / 2, f"{received} of {published} frames reached the node: quiet windows mean nothing"
    # A cost paid on every frame (glibc's defaults: hundreds of faults per frame) shows in every window. The heap
    # growing to a new high-water mark (one frame's pages; more often on a busy CPU, when more frames are held at
    # once) shows in a few: so the lower quartile, not the median.
    assert statistics.quantiles(per_frame, n=4)[0] < 20, f"page faults per 1080p frame, per second: {per_frame}"
    assert client.stats[-1]["frame_memory"].startswith("freed frame buffers kept for reuse"), client.stats[-1]


KEEP_AND_CHURN = """
import collections, resource, sys
from spatialthinker_ros.ros.camera_inputs import keep_freed_frame_memory
if sys.argv[1] == "keep":
    print(keep_freed_frame_memory())
colour, depth = collections.deque(maxlen=3), collections.deque(maxlen=8)   # the node's frame rings
def frames(n):
    for _ in range(n):
        colour.append(bytearray(1920 * 1080 * 3))
        depth.append(bytearray(1920 * 1080 * 2))
frames(20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
frames(100)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 100)
"""


def churn(mode: str, **env: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", KEEP_AND_CHURN, mode], capture_output=True, text=True, timeout=60, cwd="/",
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_kept_frame_memory_is_reused_where_glibc_defaults_fault_on_every_frame():
    (plain,) = churn("plain")
    message, kept = churn("keep")
    assert "freed frame buffers kept for reuse" in message
    assert float(kept) < 1 < float(plain), (kept, plain)


def test_the_users_own_malloc_settings_win():
    message, _ = churn("keep", MALLOC_TRIM_THRESHOLD_=str(1 << 20))
    assert message == "malloc left as configured by MALLOC_TRIM_THRESHOLD_"
