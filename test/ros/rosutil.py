"""Helpers for tests that run real ROS 2 processes: start/stop by pid, spin with a deadline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import rclpy
from rclpy.executors import SingleThreadedExecutor

VENV_BIN = Path(sys.executable).parent


class Process:
    """A child process whose output goes to a file, so a failing test can show it."""

    def __init__(self, args: Sequence[str], log_path: Path, env: Optional[dict] = None):
        self.args = list(args)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT,
                                      env=env or os.environ.copy(), start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGINT, timeout: float = 10.0) -> Optional[int]:
        """Ask the process (by its own pid) to stop; kill it if it does not within timeout."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=timeout)
        self._log.close()
        return self.popen.returncode


def spin_until(node, predicate: Callable[[], bool], timeout: float, executor=None) -> bool:
    """Spin `node` until predicate() is true or the timeout passes. Returns predicate()."""
    own = executor is None
    if own:
        executor = SingleThreadedExecutor(context=node.context)
        executor.add_node(node)
    deadline = time.monotonic() + timeout
    try:
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return predicate()
            executor.spin_once(timeout_sec=min(0.05, remaining))
        return True
    finally:
        if own:
            executor.remove_node(node)
            executor.shutdown()


class ReplyLost(AssertionError):
    """The node logged that a reply will never reach its caller (spatialthinker_ros.ros.replies)."""


def spin_future(node, future, timeout: float, proc: Optional["Process"] = None):
    """Spin until the rclpy future is done; raise TimeoutError otherwise. With `proc` (the node answering), fail
    at once with the node's own line when it says the reply is lost, and quote its reply lines on a timeout."""
    from spatialthinker_ros.ros.replies import REPLY_LOST, dropped_reply_lines

    checked = [time.monotonic()]

    def lost() -> bool:   # the log is read twice a second, not on every spin
        if proc is None or time.monotonic() - checked[0] < 0.5:
            return False
        checked[0] = time.monotonic()
        return any(REPLY_LOST in line for line in dropped_reply_lines(proc.output()))

    if not spin_until(node, lambda: future.done() or lost(), timeout):
        lines = dropped_reply_lines(proc.output()) if proc is not None else []
        raise TimeoutError(f"no result within {timeout} s" + (f"; the node logged: {lines}" if lines else ""))
    if not future.done():
        raise ReplyLost(f"the node's reply was lost in transport: {dropped_reply_lines(proc.output())}")
    return future.result()


def new_context():
    context = rclpy.Context()
    rclpy.init(context=context)
    return context


# ----------------------------------------------------------------------------- node under test
import threading  # noqa: E402

import numpy as np  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import CameraInfo, CompressedImage, Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from spatialthinker_ros.launch_config import parameter_arguments  # noqa: E402

NODE_EXECUTABLE = str(VENV_BIN / "spatialthinker_node")


def node_args(**params) -> list[str]:
    """spatialthinker_node command line with -p name:=value for each parameter (lists as YAML)."""
    return [NODE_EXECUTABLE, "--ros-args", *parameter_arguments(params)]


def pattern_image(width: int, height: int) -> np.ndarray:
    """A deterministic RGB image with structure (so JPEG and resizing have something to keep)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)),
                     ((x // 32 + y // 32) % 2) * 255], axis=-1).astype(np.uint8)


class CameraStreamer:
    """Publishes colour (+ depth + CameraInfo) at a fixed rate from its own executor thread, like a driver."""

    def __init__(self, context, prefix: str = "", width: int = 640, height: int = 480, rate_hz: float = 20.0,
                 frame_id: str = "camera_color_optical_frame", compressed: bool = False,
                 depth_m: Optional[np.ndarray] = None, depth_encoding: str = "32FC1", k=None,
                 stamp_offset_s: float = 0.0, depth_lags: bool = False):
        self.node = Node(f"camera_streamer_{abs(hash(prefix)) % 10000}", context=context)
        self.rgb = pattern_image(width, height)
        self.frame_id, self.compressed, self.stamp_offset_s = frame_id, compressed, stamp_offset_s
        self.depth_m, self.depth_encoding = depth_m, depth_encoding
        # depth_lags: each depth frame (and CameraInfo) goes out with the previous colour frame's stamp, as from a
        # driver whose depth arrives one frame late
        self.depth_lags, self._previous_header = depth_lags, None
        self.k = k or [500.0, 0.0, width / 2, 0.0, 500.0, height / 2, 0.0, 0.0, 1.0]
        self.published_stamps: list = []
        qos = qos_profile_sensor_data
        if compressed:
            import cv2
            ok, jpeg = cv2.imencode(".jpg", self.rgb[:, :, ::-1])
            self.jpeg = jpeg.tobytes()
            self.colour_pub = self.node.create_publisher(CompressedImage, f"{prefix}image/compressed", qos)
        else:
            self.colour_pub = self.node.create_publisher(Image, f"{prefix}image", qos)
        self.depth_pub = self.node.create_publisher(Image, f"{prefix}depth", qos)
        self.info_pub = self.node.create_publisher(CameraInfo, f"{prefix}camera_info", qos)
        self.node.create_timer(1.0 / rate_hz, self.publish)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def header(self):
        from std_msgs.msg import Header
        stamp = self.node.get_clock().now()
        if self.stamp_offset_s:
            from rclpy.duration import Duration
            stamp = stamp - Duration(nanoseconds=int(self.stamp_offset_s * 1e9))
        return Header(stamp=stamp.to_msg(), frame_id=self.frame_id)

    def publish(self) -> None:
        header = self.header()
        h, w = self.rgb.shape[:2]
        if self.compressed:
            self.colour_pub.publish(CompressedImage(header=header, format="jpeg", data=self.jpeg))
        else:
            self.colour_pub.publish(Image(header=header, height=h, width=w, encoding="rgb8", step=w * 3,
                                          data=self.rgb.tobytes()))
        depth_header, self._previous_header = (self._previous_header, header) if self.depth_lags else (header, None)
        if self.depth_m is not None and depth_header is not None:
            dh, dw = self.depth_m.shape
            if self.depth_encoding == "16UC1":
                data, step = (self.depth_m * 1000).astype(np.uint16).tobytes(), dw * 2
            else:
                data, step = self.depth_m.astype(np.float32).tobytes(), dw * 4
            self.depth_pub.publish(Image(header=depth_header, height=dh, width=dw, encoding=self.depth_encoding,
                                         step=step, data=data))
            self.info_pub.publish(CameraInfo(header=depth_header, width=dw, height=dh, k=self.k))
        self.published_stamps.append((header.stamp.sec, header.stamp.nanosec))

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=2.0)
        self.thread.join(timeout=5.0)
        self.node.destroy_node()


class FramePublisher:
    """Publishes, at `rate_hz` from its own thread, whatever each topic's maker returns (None: nothing)."""

    def __init__(self, context, rate_hz: float = 30.0):
        self.node = Node(f"bad_camera_{id(self)}", context=context)
        self._lock = threading.Lock()
        self._makers: dict[str, Callable[[Header], Optional[object]]] = {}
        self._publishers: dict[str, object] = {}
        self.published: dict[str, int] = {}
        self.node.create_timer(1.0 / rate_hz, self._tick)
        self._executor = SingleThreadedExecutor(context=context)
        self._executor.add_node(self.node)
        self._thread = threading.Thread(target=self._executor.spin, daemon=True)
        self._thread.start()

    def set(self, topic: str, msg_type, maker: Callable[[Header], Optional[object]]) -> None:
        with self._lock:
            if topic not in self._publishers:
                self._publishers[topic] = self.node.create_publisher(msg_type, topic, qos_profile_sensor_data)
            self._makers[topic] = maker
            self.published[topic] = 0

    def _tick(self) -> None:
        stamp = self.node.get_clock().now().to_msg()
        with self._lock:
            makers = list(self._makers.items())
        for topic, maker in makers:
            msg = maker(Header(stamp=stamp, frame_id="camera_optical"))
            if msg is not None:
                self._publishers[topic].publish(msg)
                self.published[topic] += 1

    def close(self) -> None:
        self._executor.shutdown(timeout_sec=2.0)
        self._thread.join(timeout=5.0)
        self.node.destroy_node()
