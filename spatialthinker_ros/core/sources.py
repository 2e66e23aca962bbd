"""Which image a question is about, and the depth paired with it: the source rules of the node and the evaluation.

A request's own image wins over the cameras; otherwise the camera it names (or the first configured one) gives
its newest frame young enough, with depth when a depth frame was stamped close enough to it and shows the same
field of view. Messages are duck-typed as in core/images.py (rclpy's and rosbags' alike), so the ROS layer only
hands over what it received and the evaluation reads recordings under the same rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence, TypeVar

import numpy as np

from spatialthinker_ros.core.geometry import CameraIntrinsics, DepthImage
from spatialthinker_ros.core.images import colour_to_rgb, depth_image, image_to_rgb
from spatialthinker_ros.core.request import (ErrorCode, ImageError, RequestError, check_frame_id, check_image_age,
                                             depth_aspect_mismatch, max_image_age, request_image_error)
from spatialthinker_ros.core.text import excerpt

Warn = Callable[[str, str], None]   # (throttling key, message): a problem that does not stop the answer


@dataclass
class Source:
    """The image a question is about, converted, with the depth (registered to it) and intrinsics when paired.
    `header` is whatever stamped the image (a ROS header): outputs carry it; the core never reads it."""

    rgb: np.ndarray
    camera: str = ""                 # "" for a request's own image or an evaluation row
    header: Any = None
    depth: Optional[DepthImage] = None
    intrinsics: Optional[CameraIntrinsics] = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the colour image."""
        return self.rgb.shape[1], self.rgb.shape[0]


@dataclass(frozen=True)
class SourceSettings:
    """The node parameters these rules read (core/config.py holds their defaults and documents each)."""

    use_depth: bool
    max_image_age: float             # seconds; 0 = no limit
    depth_sync_tolerance: float      # seconds
    depth_scale: float               # metres per unit of integer depth
    max_request_image_pixels: int


class Timed(Protocol):
    time: float   # seconds: the header stamp, or the receipt/log time when the driver left the stamp at zero


T = TypeVar("T", bound=Timed)


class CameraFrames(Protocol):
    """What the rules need of one camera's kept frames (ros/camera_inputs.py CameraInput)."""

    name: str
    topic: str                                   # where colour frames arrive, for the "no frame yet" error
    colours: Sequence[Timed]                     # oldest first; each has .msg
    depth: Sequence[Timed]
    intrinsics: Optional[CameraIntrinsics]
    frames_decoded: int

    def discard(self, frame: Any) -> None: ...


# ------------------------------------------------------------------------------------------------ request image
def has_request_image(image: Any) -> bool:
    """Whether a request's sensor_msgs/Image is meant to be used. Any field set counts, not only data: a caller
    that meant to send an image but left data empty gets ERROR_INVALID_REQUEST, never an answer about a camera
    it did not ask about (AskSpatial.srv says the same)."""
    return bool(len(image.data) > 0 or image.width or image.height or image.step or image.encoding)


def request_source(image: Any, max_pixels: int) -> Source:
    """The request's own image (its header is kept for the outputs); InvalidRequest when it cannot be used."""
    check_frame_id(image.header.frame_id)
    try:
        return Source(image_to_rgb(image, max_pixels), header=image.header)
    except ImageError as exc:
        raise request_image_error(exc) from None


# ------------------------------------------------------------------------------------------------ cameras
def choose_camera(requested: str, configured: Sequence[str]) -> str:
    """The camera a request names, "" meaning the first configured one; UNKNOWN_CAMERA for any other name."""
    name = requested or configured[0]
    if name not in configured:
        raise RequestError(f"unknown camera {excerpt(name)!r}; configured: {', '.join(configured)}",
                           ErrorCode.UNKNOWN_CAMERA)
    return name


def closest_in_time(candidates: Sequence[T], time: float, tolerance: float) -> Optional[T]:
    """The candidate stamped closest to `time`, if within `tolerance` seconds (depth paired with colour)."""
    best = min(candidates, key=lambda c: abs(c.time - time), default=None)
    if best is None or abs(best.time - time) > tolerance:
        return None
    return best


def newest_paired(colours: Sequence[T], depths: Sequence[Timed], tolerance: float,
                  oldest: float = -math.inf) -> tuple[Optional[T], Optional[Timed]]:
    """The newest colour frame not older than `oldest` that has a depth frame within tolerance, and that depth
    frame; when none has, the newest colour frame and None. An older frame with depth beats a newer one without,
    since drivers publish colour and depth separately and a request can fall between the two."""
    for colour in reversed(colours):
        if colour.time < oldest:
            break
        depth = closest_in_time(depths, colour.time, tolerance)
        if depth is not None:
            return colour, depth
    return (colours[-1] if colours else None), None


def camera_source(camera: CameraFrames, now: float, requested_max_age: float, settings: SourceSettings,
                  warn: Warn) -> Source:
    """The frame of `camera` a request is answered on, with its depth when one pairs.

    Refusals are RequestErrors: NO_IMAGE (no frame yet, or the chosen frame cannot be decoded: it is then discarded),
    STALE_IMAGE (older than the request's or the node's max_image_age). Depth that does not pair is left out
    with a warning: the answer then has no 3D positions.
    """
    max_age = max_image_age(requested_max_age, settings.max_image_age)
    depth = None
    if settings.use_depth:   # an older frame with depth only while it is fresh enough itself
        oldest = now - max_age if max_age > 0 else -math.inf
        frame, depth = newest_paired(camera.colours, camera.depth, settings.depth_sync_tolerance, oldest)
    else:
        frame = camera.colours[-1] if camera.colours else None
    if frame is None:
        raise RequestError(f"camera {camera.name!r} has not delivered a frame yet on {camera.topic}: ask again once "
                           f"it publishes there (ros2 topic hz {camera.topic})", ErrorCode.NO_IMAGE)
    check_image_age(now - frame.time, max_age, camera.name)
    camera.frames_decoded += 1
    try:
        rgb = colour_to_rgb(frame.msg, settings.max_request_image_pixels)
    except ImageError as exc:
        camera.discard(frame)
        warn(f"decode/{camera.name}", f"camera {camera.name!r}: frame dropped: {exc}")
        raise RequestError(f"latest frame of camera {camera.name!r} is unusable: {exc}", ErrorCode.NO_IMAGE) from None
    source = Source(rgb, camera=camera.name, header=frame.msg.header)
    if depth is None or camera.intrinsics is None:
        return source
    mismatch = depth_aspect_mismatch(source.size, (depth.msg.width, depth.msg.height))
    if mismatch:
        warn(f"aspect/{camera.name}", f"camera {camera.name!r}: {mismatch}: no 3D positions")
        return source
    try:
        source.depth = depth_image(depth.msg, settings.depth_scale, settings.max_request_image_pixels)
        source.intrinsics = camera.intrinsics
    except ValueError as exc:   # ImageError included
        warn(f"depth/{camera.name}", f"camera {camera.name!r}: depth unusable: {exc}")
    return source
