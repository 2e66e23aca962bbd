"""The README's offline recipe (node on replay, spatialthinker_camera, one question), run exactly as written, and
spatialthinker_camera on its own."""

import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from spatialthinker_ros.testing.fake_cameras import pattern_image
from spatialthinker_ros.testing.node_client import spin_until
from spatialthinker_ros.testing.processes import WaitFailed

pytestmark = pytest.mark.timeout(240)

README = Path(__file__).resolve().parents[2] / "README.md"
RECIPE = re.compile(r"<!-- offline recipe: begin -->\n```bash\n(.*?)```\n<!-- offline recipe: end -->", re.S)
RUN_S = 120.0


def test_the_readme_offline_recipe_answers_with_3d_positions(spawn, tmp_path):
    [recipe] = RECIPE.findall(README.read_text())
    # The recipe runs from the repository root, where .venv is; here .venv is this test's own environment
    # (.venv-kilted under ROS_DISTRO=kilted).
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(Path(sys.prefix))
    (work / "recipe.sh").write_text(recipe)
    shell = spawn(["bash", "-c", 'cd "$0" && exec bash recipe.sh', str(work)], name="recipe")
    started: dict[int, psutil.Process] = {}   # the node and the camera it starts in the background
    try:
        deadline = time.monotonic() + RUN_S
        while shell.alive():
            try:
                for child in psutil.Process(shell.pid).children(recursive=True):
                    started.setdefault(child.pid, child)
            except psutil.NoSuchProcess:
                pass
            if time.monotonic() > deadline:
                raise WaitFailed(f"the recipe did not finish within {RUN_S:.0f} s: {shell.describe}")
            time.sleep(0.2)
        output = shell.output()
        assert shell.exit_code() == 0, output
        assert "answer: (A) left of" in output, output
        objects = [line for line in output.splitlines() if re.match(r"^\w+\.\d+ ", line)]
        assert len(objects) >= 3 and all(re.search(r"z \d\.\d\d m$", line) for line in objects), output
        # the node's log says nothing a user would read as a failure or could not act on while the recipe waits
        assert "has not delivered a frame" not in output and "freed frame buffers" not in output, output
        # `kill %1 %2` stopped the node and the camera
        assert psutil.wait_procs(list(started.values()), timeout=15)[1] == [], "the recipe left processes running"
    finally:
        for process in started.values():   # only what the recipe started, by pid
            if process.is_running():
                process.kill()


def test_the_camera_streams_an_image_file_compressed_under_a_namespace_and_refuses_bad_files(spawn, ros_context,
                                                                                              tmp_path):
    import cv2
    import numpy as np
    from rclpy.node import Node
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import CompressedImage

    camera = Path(sys.executable).parent / "spatialthinker_camera"
    rgb = pattern_image(64, 48)
    cv2.imwrite(str(tmp_path / "frame.png"), rgb[:, :, ::-1])
    proc = spawn([str(camera), "--image", str(tmp_path / "frame.png"), "--compressed", "png", "--rate", "20",
                  "--frame-id", "front_optical", "--ros-args", "-r", "__ns:=/front"], name="camera")
    listener = Node("camera_listener", context=ros_context)
    try:
        received = []
        listener.create_subscription(CompressedImage, "/front/image/compressed", received.append,
                                     qos_profile_sensor_data)
        assert spin_until(listener, lambda: len(received) >= 2, 30.0), proc.describe
    finally:
        listener.destroy_node()
    first, second = received[:2]
    assert (first.format, first.header.frame_id) == ("png", "front_optical")
    assert (second.header.stamp.sec, second.header.stamp.nanosec) > (first.header.stamp.sec, first.header.stamp.nanosec)
    decoded = cv2.imdecode(np.frombuffer(bytes(first.data), np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    assert (decoded == rgb).all(), "PNG is lossless: the file's pixels arrive"
    for args, message in ((["--image", str(tmp_path / "missing.png")], "does not exist"),
                          (["--image", str(tmp_path / "frame.png"), "--fx", "500"], "given without --depth"),
                          (["--image", str(tmp_path / "frame.png"), "--rate", "0"], "--rate must be a positive")):
        done = subprocess.run([str(camera), *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and done.stdout == "", done.stderr
        assert done.stderr.startswith("spatialthinker_camera: error: ") and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
