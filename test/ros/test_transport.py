"""Camera-sized frames cross between processes with the shipped Fast DDS profile, on either Fast DDS.

Without the profile (or with it named by the variable the installed Fast DDS does not read: Jazzy's Fast DDS 2.14
ignores FASTDDS_DEFAULT_PROFILES_FILE) a 640x480 rgb8 frame is fragmented over UDP and most frames are lost.
"""

import os
import subprocess
import sys
import textwrap

from rclpy.node import Node
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import Image

from spatialthinker_ros.distro import PROFILE_VARIABLES, fastdds_profile_variable
from spatialthinker_ros.testing.node_client import spin_until, spin_wait

FRAMES = 60
PUBLISHER = textwrap.dedent(f"""
    import time, rclpy
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image
    rclpy.init()
    node = rclpy.create_node("frame_source")
    pub = node.create_publisher(Image, "frames", qos_profile_sensor_data)
    deadline = time.monotonic() + 60
    while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.05)
    msg = Image(height=480, width=640, encoding="rgb8", step=1920, data=bytes(640 * 480 * 3))
    for index in range({FRAMES}):
        msg.header.frame_id = str(index)
        pub.publish(msg)
        time.sleep(1 / 30)   # a camera's rate
    """)


def test_the_suite_names_the_profile_by_the_variable_the_installed_fast_dds_reads():
    chosen = fastdds_profile_variable()
    assert os.environ.get(chosen, "").endswith("fastdds_large_images.xml")
    assert all(not os.environ.get(other) for other in PROFILE_VARIABLES if other != chosen)


def test_640x480_frames_at_30_hz_reach_another_process(ros_context, spawn):
    node = Node("frame_sink", context=ros_context)
    received = {}   # frame index -> size
    # best effort, as cameras publish; a history of every frame, so a stall of this busy process loses none
    qos = QoSProfile(depth=FRAMES, reliability=qos_profile_sensor_data.reliability)
    node.create_subscription(Image, "frames", lambda msg: received.setdefault(int(msg.header.frame_id), len(msg.data)),
                             qos)
    try:
        publisher = spawn([sys.executable, "-c", PUBLISHER], name="frame-source")
        spin_wait(node, lambda: not publisher.alive(), 120.0, "the frame source to publish its frames")
        assert publisher.exit_code() == 0, publisher.output()
        when_done = len(received)
        spin_until(node, lambda: len(received) == FRAMES, 3.0)   # the last frames may still be on their way
        # the source starts once it has matched this reader, which may match it a little later: frames sent before
        # then were never this reader's to lose
        sent = FRAMES - min(received, default=FRAMES)
        assert len(received) >= max(0.9 * sent, FRAMES / 2), (
            f"only {len(received)} of {sent} frames arrived ({when_done} when the source exited): is the "
            f"profile named by {fastdds_profile_variable()}?")
        assert set(received.values()) == {640 * 480 * 3}
    finally:
        node.destroy_node()
