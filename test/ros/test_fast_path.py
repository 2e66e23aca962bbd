"""Fast-path behaviour of the real node that the benchmarks rely on (bench/README.md): camera frames are decoded
only when a request uses one, never on arrival."""

from __future__ import annotations

import pytest
from rosutil import node_args, spin_until
from sensor_msgs.msg import CompressedImage
from test_node import CALL, E, OPTIONS, QUESTION, client, replay_file, replay_params  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(120)

# Starts and ends like a JPEG (so the O(1) check on arrival passes) but holds no image: only decoding can tell.
UNDECODABLE_JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8 + b"\xff\xd9"


def test_frames_are_decoded_only_when_a_request_uses_one(spawn, client, frames, replay_file):
    proc = spawn(node_args(**replay_params(replay_file, image_transport="compressed", use_depth=False,
                                           max_image_age=0.0)), name="node")
    frames.set("image/compressed", CompressedImage,
               lambda header: CompressedImage(header=header, format="jpeg", data=UNDECODABLE_JPEG))
    client.wait_for_service(proc)
    assert spin_until(client.node, lambda: frames.published["image/compressed"] >= 60, CALL)
    spin_until(client.node, lambda: False, 0.5)   # the last frames are delivered
    assert "could not be decoded" not in proc.output(), "a frame was decoded on arrival, before any request"
    response = client.ask(question=QUESTION, options=OPTIONS)
    assert response.error_code == E.ERROR_NO_IMAGE and "could not be decoded" in response.message, response.message
    assert spin_until(client.node, lambda: "frame dropped" in proc.output(), CALL)
    assert proc.output().count("frame dropped") == 1, "only the frame the request used was decoded"
