"""ROS messages <-> core types. Frames are converted only here, and only when a request uses them.

No cv_bridge: the PyPI one is broken with numpy 2 (see README), and these few encodings need only numpy views.
"""

from __future__ import annotations

import numpy as np
import cv2
from builtin_interfaces.msg import Duration
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header

from spatialthinker_ros.core.geometry import CameraIntrinsics, DepthImage
from spatialthinker_ros.core.types import SceneGraph, SpatialResult
from spatialthinker_ros.msg import SceneGraph as SceneGraphMsg
from spatialthinker_ros.msg import SceneObject as SceneObjectMsg
from spatialthinker_ros.msg import SceneRelation as SceneRelationMsg
from spatialthinker_ros.msg import SpatialAnswer

# encoding -> (channels, dtype, conversion of the HxWxC array to RGB, or None when already RGB)
COLOUR_ENCODINGS = {
    "rgb8": (3, np.uint8, None),
    "bgr8": (3, np.uint8, cv2.COLOR_BGR2RGB),
    "rgba8": (4, np.uint8, cv2.COLOR_RGBA2RGB),
    "bgra8": (4, np.uint8, cv2.COLOR_BGRA2RGB),
    "mono8": (1, np.uint8, cv2.COLOR_GRAY2RGB),
    "8uc1": (1, np.uint8, cv2.COLOR_GRAY2RGB),
    "8uc3": (3, np.uint8, cv2.COLOR_BGR2RGB),   # OpenCV's convention for untyped 3-channel images
    "mono16": (1, np.uint16, cv2.COLOR_GRAY2RGB),
}
DEPTH_ENCODINGS = {"16uc1": np.uint16, "mono16": np.uint16, "32fc1": np.float32}


JPEG_SIGNATURE = b"\xff\xd8\xff"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageError(ValueError):
    """An image message that cannot be used; the message says exactly why."""


def clip(text: str, limit: int = 64) -> str:
    """A caller's string, shortened for a log line or an error message (callers control their length)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_image_layout(msg: Image, supported: dict, max_pixels: int) -> tuple[int, np.dtype]:
    """O(1) checks that make a later zero-copy view safe. Returns (channels or 0, dtype)."""
    encoding = msg.encoding.lower()
    if encoding not in supported:
        raise ImageError(f"unsupported encoding {clip(msg.encoding)!r} (supported: {', '.join(sorted(supported))})")
    spec = supported[encoding]
    channels, dtype = (spec[0], spec[1]) if isinstance(spec, tuple) else (1, spec)
    if msg.width == 0 or msg.height == 0:
        raise ImageError(f"image has zero size ({msg.width}x{msg.height})")
    if msg.width * msg.height > max_pixels:
        raise ImageError(f"image of {msg.width}x{msg.height} exceeds the {max_pixels}-pixel limit")
    row_bytes = msg.width * channels * np.dtype(dtype).itemsize
    if msg.step < row_bytes:
        raise ImageError(f"step {msg.step} is smaller than width x pixel size ({row_bytes} bytes)")
    if len(msg.data) != msg.step * msg.height:   # more is as wrong as less: e.g. rgb8 data sent as mono8
        raise ImageError(f"data holds {len(msg.data)} bytes, step x height is {msg.step * msg.height}")
    return channels, np.dtype(dtype)


def _view(msg: Image, channels: int, dtype: np.dtype) -> np.ndarray:
    """Zero-copy HxWxC view of the pixels, honouring step (row padding) and is_bigendian."""
    buffer = np.frombuffer(msg.data, dtype=np.uint8, count=msg.step * msg.height).reshape(msg.height, msg.step)
    rows = buffer[:, : msg.width * channels * dtype.itemsize]
    order = ">" if msg.is_bigendian else "<"
    array = rows.view(dtype.newbyteorder(order) if dtype.itemsize > 1 else dtype)
    return array.reshape(msg.height, msg.width, channels)


def image_to_rgb(msg: Image, max_pixels: int) -> np.ndarray:
    """Any supported colour/mono Image -> contiguous RGB uint8 HxWx3."""
    channels, dtype = check_image_layout(msg, COLOUR_ENCODINGS, max_pixels)
    array = _view(msg, channels, dtype)
    if dtype == np.uint16:
        array = (array.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)
    conversion = COLOUR_ENCODINGS[msg.encoding.lower()][2]
    if conversion is None:
        return np.ascontiguousarray(array)
    return cv2.cvtColor(np.ascontiguousarray(array), conversion)


def check_compressed(msg: CompressedImage) -> None:
    """O(1) check that the data starts and ends as a JPEG or PNG does: garbage and truncated frames are refused
    on arrival (decoding waits for a request), so they never replace the last good frame."""
    if not msg.data:
        raise ImageError("compressed image has no data")
    head, tail = bytes(msg.data[:8]), bytes(msg.data[-32:])   # the end marker, allowing a little padding
    what = f"compressed image ({clip(msg.format)!r}, {len(msg.data)} bytes)"
    if head.startswith(JPEG_SIGNATURE):
        if b"\xff\xd9" not in tail:
            raise ImageError(f"{what} is a truncated JPEG (no end marker)")
    elif head == PNG_SIGNATURE:
        if b"IEND" not in tail:
            raise ImageError(f"{what} is a truncated PNG (no IEND chunk)")
    else:
        raise ImageError(f"{what} is neither JPEG nor PNG")


def compressed_to_rgb(msg: CompressedImage, max_pixels: int) -> np.ndarray:
    """JPEG/PNG CompressedImage -> RGB uint8 HxWx3 (decoded by OpenCV)."""
    check_compressed(msg)
    data = np.frombuffer(msg.data, dtype=np.uint8)
    decoded = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if decoded is None:
        raise ImageError(f"compressed image ({clip(msg.format) or 'unknown format'}, {len(msg.data)} bytes) could not be decoded")
    if decoded.shape[0] * decoded.shape[1] > max_pixels:
        raise ImageError(f"decoded image of {decoded.shape[1]}x{decoded.shape[0]} exceeds the {max_pixels}-pixel limit")
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def depth_image(msg: Image, depth_scale: float, max_pixels: int) -> DepthImage:
    """16UC1 (depth_scale metres per unit) or 32FC1 (metres), as a zero-copy view read in metres where used."""
    channels, dtype = check_image_layout(msg, DEPTH_ENCODINGS, max_pixels)
    return DepthImage.from_sensor(_view(msg, channels, dtype)[:, :, 0],
                                  msg.encoding.upper().replace("MONO16", "16UC1"), depth_scale=depth_scale)


def intrinsics_from_camera_info(msg: CameraInfo) -> CameraIntrinsics:
    """Raises ValueError for a CameraInfo that cannot project (zero focal length, zero size)."""
    if msg.width == 0 or msg.height == 0:
        raise ValueError(f"CameraInfo has zero image size ({msg.width}x{msg.height})")
    return CameraIntrinsics.from_k(list(msg.k), msg.width, msg.height)


def rgb_to_image_msg(rgb: np.ndarray, header: Header) -> Image:
    """`data = arr.tobytes()`: assigning an ndarray to Image.data is ~100x slower in rclpy."""
    msg = Image(header=header, height=rgb.shape[0], width=rgb.shape[1], encoding="rgb8", is_bigendian=0,
                step=rgb.shape[1] * 3)
    msg.data = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    return msg


def scene_graph_msg(scene: SceneGraph, header: Header) -> SceneGraphMsg:
    msg = SceneGraphMsg(header=header, image_width=int(scene.image_size[0]), image_height=int(scene.image_size[1]))
    objects = []
    for obj in scene.objects:
        out = SceneObjectMsg(id=obj.id, label=obj.label, x_min=float(obj.box.x_min), y_min=float(obj.box.y_min),
                             x_max=float(obj.box.x_max), y_max=float(obj.box.y_max))
        if obj.position is not None:
            out.has_position = True
            p = obj.position
            out.position.x, out.position.y, out.position.z = float(p.x), float(p.y), float(p.z)
            out.size.x, out.size.y, out.size.z = float(p.size_x), float(p.size_y), float(p.size_z)
        objects.append(out)
    msg.objects = objects
    msg.relations = [SceneRelationMsg(subject=r.subject, predicate=r.predicate, object=r.object,
                                      check=int(r.check), check_note=r.check_note)
                     for r in scene.relations]
    return msg


def duration_msg(seconds: float) -> Duration:
    seconds = max(0.0, seconds)
    whole = int(seconds)
    return Duration(sec=whole, nanosec=int(round((seconds - whole) * 1e9)) % 1_000_000_000)


def spatial_answer_msg(result: SpatialResult, header: Header, request_id: str, camera: str, question: str,
                       options: list[str]) -> SpatialAnswer:
    parsed = result.parsed
    return SpatialAnswer(
        header=header, request_id=request_id, camera=camera, question=question, options=list(options),
        answer=parsed.answer, choice=parsed.choice, observation=parsed.observation, reasoning=parsed.reasoning,
        scene_graph=scene_graph_msg(parsed.scene, header), status=int(parsed.status),
        status_message=parsed.status_message, raw_response=result.inference.text, model=result.inference.model,
        prompt_tokens=max(0, int(result.inference.prompt_tokens)),
        completion_tokens=max(0, int(result.inference.completion_tokens)),
        inference_time=duration_msg(result.inference.seconds))
