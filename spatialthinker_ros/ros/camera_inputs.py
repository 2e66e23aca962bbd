"""Per-camera input state: the latest colour frames, recent depth frames and the latest CameraInfo.

Callbacks only keep references (and run O(1) layout checks); frames are converted when a request uses them,
so an idle node costs little more than the transport itself. Which frame a request uses, and the depth paired
with it, is decided in core/sources.py.
"""

from __future__ import annotations

import collections
import ctypes
import os
import platform
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from spatialthinker_ros.core.geometry import CameraIntrinsics
from spatialthinker_ros.core.request import ImageError
from spatialthinker_ros.ros.conversions import (COLOUR_LAYOUTS, DEPTH_LAYOUTS, check_compressed, check_image_layout,
                                                intrinsics_from_camera_info)

DEPTH_FRAMES_KEPT = 8   # enough to pair a colour frame with depth arriving up to ~0.25 s later at 30 Hz
# Drivers publish colour and depth separately, so a request can arrive between a colour frame and its depth. The
# frames just before the newest let it be answered with 3D on the previous frame instead (one period older).
COLOUR_FRAMES_KEPT = 3
# glibc mallopt: buffers up to 32 MiB (a 4K rgb8 frame is 24 MiB) come from the heap, whose free top is kept up to
# 128 MiB. 32 MiB is the largest mmap threshold every glibc accepts.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_FRAME_BUFFER_LIMIT, _KEPT_FREE_MEMORY = 32 << 20, 128 << 20


_frame_memory: Optional[str] = None   # what keep_freed_frame_memory did in this process (mallopt is process-wide)


def frame_memory() -> Optional[str]:
    """What keep_freed_frame_memory() did in this process (~/stats reports it); None if it was not called."""
    return _frame_memory


def keep_freed_frame_memory() -> str:
    """Makes glibc reuse freed frame buffers for the next frames instead of returning them to the OS.

    With its defaults glibc keeps handing the multi-megabyte buffers of large frames back and mapping them again,
    so the node, which holds several frames per camera, takes thousands of page faults a second at raw 1080p and
    costs clearly more CPU than a bare subscriber (the figures, before and after: bench/README.md, "The fast
    path"). Returns what was done, for the log. It is left alone on other C libraries and when the user set
    MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ (theirs then applies).
    """
    global _frame_memory
    _frame_memory = _keep_freed_frame_memory()
    return _frame_memory


def _keep_freed_frame_memory() -> str:
    chosen = [name for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_") if name in os.environ]
    if chosen:
        return f"malloc left as configured by {' and '.join(chosen)}"
    if platform.libc_ver()[0] != "glibc":
        return "malloc left alone: not glibc"
    mallopt = ctypes.CDLL(None).mallopt
    if mallopt(_M_MMAP_THRESHOLD, _FRAME_BUFFER_LIMIT) != 1 or mallopt(_M_TRIM_THRESHOLD, _KEPT_FREE_MEMORY) != 1:
        return "malloc left alone: glibc refused mallopt"
    return (f"freed frame buffers kept for reuse (frames up to {_FRAME_BUFFER_LIMIT >> 20} MiB from the heap, "
            f"up to {_KEPT_FREE_MEMORY >> 20} MiB of free memory kept)")


def stamp_seconds(header) -> float:
    return header.stamp.sec + header.stamp.nanosec * 1e-9


def topic_prefix(camera: str) -> str:
    return "" if camera == "default" else f"{camera}/"


def camera_qos(reliability: str) -> QoSProfile:
    """Depth 1: only the latest frame matters. Best effort is what camera drivers publish (sensor data QoS); a
    reliable subscriber would receive nothing from them."""
    policy = ReliabilityPolicy.BEST_EFFORT if reliability == "best_effort" else ReliabilityPolicy.RELIABLE
    return QoSProfile(depth=1, reliability=policy, history=HistoryPolicy.KEEP_LAST)


@dataclass(eq=False)   # a frame is itself: comparing by value would compare whole images
class CameraFrame:
    """One received message with its time (core/sources.py's Timed)."""

    msg: Union[Image, CompressedImage]
    stamp: float          # header stamp, seconds (ROS time)
    received: float       # node clock at receipt, seconds (used when the driver leaves stamps at zero)

    @property
    def time(self) -> float:
        return self.stamp if self.stamp > 0 else self.received


class CameraInput:
    """State of one camera. Accessed from the executor thread only."""

    def __init__(self, name: str, topic: str, max_pixels: int):
        self.name = name
        self.topic = topic        # where its colour frames arrive (fully resolved), for the "no frame yet" error
        self.max_pixels = max_pixels
        self.colours: collections.deque[CameraFrame] = collections.deque(maxlen=COLOUR_FRAMES_KEPT)
        self.depth: collections.deque[CameraFrame] = collections.deque(maxlen=DEPTH_FRAMES_KEPT)
        self.intrinsics: Optional[CameraIntrinsics] = None   # of the latest usable CameraInfo
        self.with_depth = False   # whether depth and CameraInfo were subscribed at the last activate (use_depth)
        self.frames_received = 0
        self.frames_dropped = 0
        self.frames_decoded = 0   # by requests that used a frame (~/stats)

    @property
    def colour(self) -> Optional[CameraFrame]:
        """The newest colour frame."""
        return self.colours[-1] if self.colours else None

    def subscribe(self, node, qos: QoSProfile, use_depth: bool, group, warn: Callable[[str, str], None],
                  now: Callable[[], float], max_age: Callable[[], float]) -> list:
        """The subscriptions feeding this camera (colour; depth and CameraInfo with use_depth). Refused messages are
        warned about, throttled per camera and kind."""
        prefix = topic_prefix(self.name)
        self.with_depth = use_depth
        feeds: list[tuple[Any, str, str, str, Callable[[Any], Optional[str]]]] = [
            (CompressedImage if self.topic.endswith("/compressed") else Image, self.topic, "colour", "frame dropped",
             lambda msg: self.offer_colour(msg, now(), max_age()))]
        if use_depth:
            feeds += [(Image, f"{prefix}depth", "depth", "depth dropped", lambda msg: self.offer_depth(msg, now())),
                      (CameraInfo, f"{prefix}camera_info", "info", "CameraInfo ignored", self.offer_info)]

        def feeding(key: str, dropped: str, offer: Callable[[Any], Optional[str]]) -> Callable[[Any], None]:
            def callback(msg) -> None:
                reason = offer(msg)
                if reason:
                    warn(key, f"camera '{self.name}': {dropped}: {reason}")
            return callback

        return [node.create_subscription(msg_type, topic, feeding(f"{kind}/{self.name}", dropped, offer), qos,
                                         callback_group=group)
                for msg_type, topic, kind, dropped, offer in feeds]

    def forget_frames(self) -> None:
        """Drop every kept frame (the node stopped listening: they would only grow old)."""
        self.colours.clear()
        self.depth.clear()

    def discard(self, frame: CameraFrame) -> None:
        """Never offer an unusable frame twice."""
        if frame in self.colours:
            self.colours.remove(frame)

    def offer_colour(self, msg, now: float, max_age: float) -> Optional[str]:
        """Keep msg as the latest frame. Returns why it was dropped instead, or None."""
        self.frames_received += 1
        reason = self._check_colour(msg)
        frame = CameraFrame(msg, stamp_seconds(msg.header), now)
        if reason is None and self.colour is not None and frame.stamp > 0 and frame.stamp < self.colour.stamp:
            kept_is_fresh = max_age <= 0 or now - self.colour.time <= max_age
            if kept_is_fresh:   # a stale kept frame is replaced: the source clock was reset (e.g. a bag loop)
                reason = (f"stamp {frame.stamp:.3f} is older than the kept frame's {self.colour.stamp:.3f} "
                          "(stamps going backwards)")
        if reason is not None:
            self.frames_dropped += 1
            return reason
        self.colours.append(frame)
        return None

    def _check_colour(self, msg) -> Optional[str]:
        try:
            if isinstance(msg, CompressedImage):
                check_compressed(msg)
            else:
                check_image_layout(msg, COLOUR_LAYOUTS, self.max_pixels)
        except ImageError as exc:
            return str(exc)
        return None

    def offer_depth(self, msg: Image, now: float) -> Optional[str]:
        try:
            check_image_layout(msg, DEPTH_LAYOUTS, self.max_pixels)
        except ImageError as exc:
            return f"depth {exc}"
        self.depth.append(CameraFrame(msg, stamp_seconds(msg.header), now))
        return None

    def offer_info(self, msg: CameraInfo) -> Optional[str]:
        """Keep the intrinsics of msg (9 numbers: converted at once). Returns why it cannot project instead, or None."""
        try:
            self.intrinsics = intrinsics_from_camera_info(msg)
        except ValueError as exc:
            return str(exc)
        return None
