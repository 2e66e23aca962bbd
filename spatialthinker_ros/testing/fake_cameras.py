"""Camera stand-ins on a real ROS graph: FakeCamera streams like a driver (colour, depth, CameraInfo), and
FramePublisher sends whatever frames a test makes (malformed ones included). Each spins its own node on a thread,
so frames keep flowing while the caller waits. rclpy is imported when one is built."""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Optional, Sequence

import numpy as np


def pattern_image(width: int, height: int) -> np.ndarray:
    """A deterministic RGB image with structure (so JPEG and resizing have something to keep)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)),
                     ((x // 32 + y // 32) % 2) * 255], axis=-1).astype(np.uint8)


def spin_in_thread(node: Any, context: Any, name: str) -> tuple[Any, threading.Thread]:
    """`node` spun by an executor of its own on a daemon thread; shut the executor down and join the thread."""
    from rclpy.executors import SingleThreadedExecutor

    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    thread = threading.Thread(target=executor.spin, name=name, daemon=True)
    thread.start()
    return executor, thread


class FakeCamera:
    """Publishes colour (rgb8, or JPEG on image/compressed) + depth + CameraInfo at a fixed rate, with sensor-data
    QoS and one stamp per frame, like a driver. Depth and CameraInfo go out before the colour frame of the same
    stamp, as they pair in the node. It spins its own node on a thread in `context`, so frames keep flowing while
    the caller waits.

    depth_m: metres, sent as `depth_encoding` (32FC1 metres or 16UC1 millimetres); None: colour only.
    depth_lags: each depth frame (and CameraInfo) carries the previous colour frame's stamp, as from a driver whose
    depth arrives one frame late.
    rgb: the colour image (default: pattern_image of width x height); jpeg_quality: with `compressed`.
    """

    def __init__(self, context: Any, prefix: str = "", width: int = 640, height: int = 480,
                 rate_hz: float = 20.0, frame_id: str = "camera_color_optical_frame", compressed: bool = False,
                 depth_m: Optional[np.ndarray] = None, depth_encoding: str = "32FC1",
                 k: Optional[Sequence[float]] = None, stamp_offset_s: float = 0.0, depth_lags: bool = False,
                 rgb: Optional[np.ndarray] = None, jpeg_quality: int = 95):
        from rclpy.node import Node
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import CameraInfo, CompressedImage, Image
        from std_msgs.msg import Header

        from spatialthinker_ros.core.geometry import CameraIntrinsics, DepthImage
        from spatialthinker_ros.ros.conversions import (camera_info_msg, depth_to_image_msg, rgb_to_compressed_msg,
                                                        rgb_to_image_msg)

        self.rgb = pattern_image(width, height) if rgb is None else np.ascontiguousarray(rgb)
        height, width = self.rgb.shape[:2]
        self.frame_id, self.compressed, self.stamp_offset_s = frame_id, compressed, stamp_offset_s
        self.depth_m, self.depth_lags, self._previous_header = depth_m, depth_lags, None
        self.published_stamps: list[tuple[int, int]] = []   # (sec, nanosec) of every colour frame sent
        self._to_subscribers = 0
        self.node = Node(f"fake_camera_{os.getpid()}_{id(self)}", context=context)
        qos = qos_profile_sensor_data
        if compressed:
            self._colour = rgb_to_compressed_msg(self.rgb, Header(), jpeg_quality=jpeg_quality)
            self.colour_pub = self.node.create_publisher(CompressedImage, f"{prefix}image/compressed", qos)
        else:
            self._colour = rgb_to_image_msg(self.rgb, Header())
            self.colour_pub = self.node.create_publisher(Image, f"{prefix}image", qos)
        self._depth = self._info = None
        if depth_m is not None:
            dh, dw = depth_m.shape
            if depth_encoding == "16UC1":
                depth = DepthImage(np.rint(depth_m * 1000).astype(np.uint16), 0.001)
            elif depth_encoding == "32FC1":
                depth = DepthImage.from_metres(depth_m.astype(np.float32))
            else:
                raise ValueError(f"depth_encoding must be 16UC1 or 32FC1, not {depth_encoding!r}")
            self._depth = depth_to_image_msg(depth, Header())
            k = list(k) if k is not None else [500.0, 0.0, dw / 2, 0.0, 500.0, dh / 2, 0.0, 0.0, 1.0]
            self._info = camera_info_msg(CameraIntrinsics.from_k(k, dw, dh), Header())
            self.depth_pub = self.node.create_publisher(Image, f"{prefix}depth", qos)
            self.info_pub = self.node.create_publisher(CameraInfo, f"{prefix}camera_info", qos)
        self._publishers = [p for p in (self.colour_pub, getattr(self, "depth_pub", None),
                                        getattr(self, "info_pub", None)) if p is not None]
        self.node.create_timer(1.0 / rate_hz, self.publish)
        self._executor, self._thread = spin_in_thread(self.node, context, "fake-camera")

    @property
    def colour_bytes(self) -> int:
        """The size of each colour frame's data (the JPEG's, when compressed)."""
        return len(self._colour.data)

    def header(self) -> Any:
        from rclpy.duration import Duration
        from std_msgs.msg import Header

        stamp = self.node.get_clock().now()
        if self.stamp_offset_s:
            stamp = stamp - Duration(nanoseconds=int(self.stamp_offset_s * 1e9))
        return Header(stamp=stamp.to_msg(), frame_id=self.frame_id)

    def publish(self) -> None:
        """One frame now (the timer calls it)."""
        header = self.header()
        depth_header, self._previous_header = (self._previous_header, header) if self.depth_lags else (header, None)
        if self._depth is not None and depth_header is not None:
            self._depth.header = self._info.header = depth_header
            self.depth_pub.publish(self._depth)
            self.info_pub.publish(self._info)
        self._colour.header = header
        self.colour_pub.publish(self._colour)
        self._to_subscribers = self._to_subscribers + 1 if self.subscribed() else 0
        self.published_stamps.append((header.stamp.sec, header.stamp.nanosec))

    def subscribed(self) -> bool:
        """Every topic this camera publishes has a subscriber."""
        return all(p.get_subscription_count() > 0 for p in self._publishers)

    @property
    def frames_to_subscribers(self) -> int:
        """Frames sent in a row while every topic had a subscriber (0 again whenever one had none)."""
        return self._to_subscribers

    def restart_count(self) -> None:
        self._to_subscribers = 0

    def unsubscribed(self) -> bool:
        """No topic has a subscriber (after a node stopped, until discovery notices, its subscriptions linger)."""
        return not any(p.get_subscription_count() for p in self._publishers)

    def close(self) -> None:
        self._executor.shutdown(timeout_sec=2.0)
        self._thread.join(timeout=5.0)
        self.node.destroy_node()


class FramePublisher:
    """Publishes, at `rate_hz` from its own thread, whatever each topic's maker returns for a header (None:
    nothing): malformed or unusual frames, one topic at a time."""

    def __init__(self, context: Any, rate_hz: float = 30.0, frame_id: str = "camera_optical"):
        from rclpy.node import Node

        self.node = Node(f"frame_publisher_{os.getpid()}_{id(self)}", context=context)
        self.frame_id = frame_id
        self._lock = threading.Lock()
        self._makers: dict[str, Callable[[Any], Optional[Any]]] = {}
        self._publishers: dict[str, Any] = {}
        self.published: dict[str, int] = {}
        self.node.create_timer(1.0 / rate_hz, self._tick)
        self._executor, self._thread = spin_in_thread(self.node, context, "frame-publisher")

    def set(self, topic: str, msg_type: Any, maker: Callable[[Any], Optional[Any]]) -> None:
        from rclpy.qos import qos_profile_sensor_data

        with self._lock:
            if topic not in self._publishers:
                self._publishers[topic] = self.node.create_publisher(msg_type, topic, qos_profile_sensor_data)
            self._makers[topic] = maker
            self.published[topic] = 0

    def _tick(self) -> None:
        from std_msgs.msg import Header

        stamp = self.node.get_clock().now().to_msg()
        with self._lock:
            makers = list(self._makers.items())
        for topic, maker in makers:
            msg = maker(Header(stamp=stamp, frame_id=self.frame_id))
            if msg is not None:
                self._publishers[topic].publish(msg)
                self.published[topic] += 1

    def close(self) -> None:
        self._executor.shutdown(timeout_sec=2.0)
        self._thread.join(timeout=5.0)
        self.node.destroy_node()

