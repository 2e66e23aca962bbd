"""Sensor images as ROS messages carry them -> numpy, without ROS: the node and recordings read by rosbags share it.

Functions take any object with the fields of sensor_msgs/Image (encoding, height, width, step, data,
is_bigendian), CompressedImage (format, data) or CameraInfo (width, height, k): rclpy messages and the
messages `rosbags` deserialises alike. No cv_bridge: the PyPI one is broken with numpy 2 (see docs/building.md), and
these few encodings need only numpy views. The rules an image must pass are the core's (core/request.py).
"""

from __future__ import annotations

import io
import warnings
from typing import Any, Optional

import cv2
import numpy as np
from PIL import Image as PillowImage
from PIL import UnidentifiedImageError

from spatialthinker_ros.core.geometry import CameraIntrinsics, DepthImage
from spatialthinker_ros.core.request import ImageError, check_image_pixels
from spatialthinker_ros.core.request import check_raw_layout
from spatialthinker_ros.core.text import excerpt

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
COLOUR_LAYOUTS = {name: (channels, dtype) for name, (channels, dtype, _) in COLOUR_ENCODINGS.items()}
DEPTH_LAYOUTS = {"16uc1": (1, np.uint16), "mono16": (1, np.uint16), "32fc1": (1, np.float32)}

JPEG_SIGNATURE = b"\xff\xd8\xff"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

def check_image_layout(msg: Any, layouts: dict, max_pixels: int) -> tuple[int, np.dtype]:
    """O(1) checks that make a later zero-copy view safe (request.check_raw_layout). Returns (channels, dtype)."""
    return check_raw_layout(msg.width, msg.height, msg.step, len(msg.data), msg.encoding, layouts, max_pixels)


def _view(msg: Any, channels: int, dtype: np.dtype) -> np.ndarray:
    """Zero-copy HxWxC view of the pixels, honouring step (row padding) and is_bigendian."""
    buffer = np.frombuffer(msg.data, dtype=np.uint8, count=msg.step * msg.height).reshape(msg.height, msg.step)
    rows = buffer[:, : msg.width * channels * dtype.itemsize]
    order = ">" if msg.is_bigendian else "<"
    array = rows.view(dtype.newbyteorder(order) if dtype.itemsize > 1 else dtype)
    return array.reshape(msg.height, msg.width, channels)


def image_to_rgb(msg: Any, max_pixels: int) -> np.ndarray:
    """Any supported colour/mono Image -> contiguous RGB uint8 HxWx3."""
    channels, dtype = check_image_layout(msg, COLOUR_LAYOUTS, max_pixels)
    array = _view(msg, channels, dtype)
    if dtype == np.uint16:
        array = (array.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)
    conversion = COLOUR_ENCODINGS[msg.encoding.lower()][2]
    if conversion is None:
        return np.ascontiguousarray(array)
    return cv2.cvtColor(np.ascontiguousarray(array), conversion)


def check_compressed(msg: Any) -> None:
    """O(1) check that the data starts and ends as a JPEG or PNG does: garbage and truncated frames are refused
    on arrival (decoding waits for a request), so they never replace the last good frame."""
    if len(msg.data) == 0:                 # bytes, array.array (rclpy) or a numpy array (rosbags)
        raise ImageError("compressed image has no data")
    head, tail = bytes(msg.data[:8]), bytes(msg.data[-32:])   # the end marker, allowing a little padding
    what = f"compressed image ({excerpt(msg.format)!r}, {len(msg.data)} bytes)"
    if head.startswith(JPEG_SIGNATURE):
        if b"\xff\xd9" not in tail:
            raise ImageError(f"{what} is a truncated JPEG (no end marker)")
    elif head == PNG_SIGNATURE:
        if b"IEND" not in tail:
            raise ImageError(f"{what} is a truncated PNG (no IEND chunk)")
    else:
        raise ImageError(f"{what} is neither JPEG nor PNG")


def check_declared_size(data: Any, max_pixels: int) -> bool:
    """Refuses (ImageError) an encoded image whose header declares more than `max_pixels`, before anything is
    decoded: a small file may declare 20000 x 20000 pixels, gigabytes once decoded. Pillow's open reads only the
    header. Returns False when Pillow does not recognise the data as an image (nothing is then known about its
    size, so it must not be decoded either)."""
    try:
        with warnings.catch_warnings():     # its own bomb warning: our limit (at most 2**26) is lower and says more
            warnings.simplefilter("ignore", PillowImage.DecompressionBombWarning)
            with PillowImage.open(io.BytesIO(bytes(data))) as image:
                width, height = image.size
    except PillowImage.DecompressionBombError:   # over twice Pillow's limit, far over ours: Pillow refuses it
        raise ImageError(f"image header declares more than {2 * PillowImage.MAX_IMAGE_PIXELS} pixels, over the "
                         f"{max_pixels}-pixel limit") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):   # SyntaxError: Pillow's "not a PNG"
        return False
    check_image_pixels(width, height, max_pixels)   # the message a decoded image of that size gets
    return True


def decode_quietly(data: bytes, flags: int = cv2.IMREAD_COLOR, *, max_pixels: int) -> Optional[np.ndarray]:
    """cv2.imdecode of an image file's bytes without OpenCV's own warnings on stderr (the caller's error says it
    all); None when they hold no image Pillow and OpenCV read. ImageError, without decoding, when the header
    declares more than `max_pixels` (check_declared_size)."""
    if not check_declared_size(data, max_pixels):
        return None
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        return cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error:
        return None
    finally:
        cv2.utils.logging.setLogLevel(level)


def decode_rgb(data: bytes, max_pixels: int) -> Optional[np.ndarray]:
    """An image file's bytes (PNG, JPEG, BMP, TIFF, WebP, ...) -> RGB uint8 HxWx3, grey and 16-bit images
    converted; None when they hold no image OpenCV reads; ImageError when the header declares over `max_pixels`."""
    bgr = decode_quietly(data, cv2.IMREAD_COLOR, max_pixels=max_pixels)
    return None if bgr is None or bgr.size == 0 else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def compressed_to_rgb(msg: Any, max_pixels: int) -> np.ndarray:
    """JPEG/PNG CompressedImage -> RGB uint8 HxWx3 (decoded by OpenCV once its header's size is within
    `max_pixels`)."""
    check_compressed(msg)
    decoded = decode_quietly(msg.data, cv2.IMREAD_COLOR, max_pixels=max_pixels)
    if decoded is None:
        raise ImageError(f"compressed image ({excerpt(msg.format) or 'unknown format'}, {len(msg.data)} bytes) "
                         "could not be decoded")
    check_image_pixels(decoded.shape[1], decoded.shape[0], max_pixels)
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def colour_to_rgb(msg: Any, max_pixels: int) -> np.ndarray:
    """A colour frame, Image or CompressedImage (the one with a `format`), -> RGB uint8 HxWx3."""
    if hasattr(msg, "format"):
        return compressed_to_rgb(msg, max_pixels)
    return image_to_rgb(msg, max_pixels)


def depth_image(msg: Any, depth_scale: float, max_pixels: int) -> DepthImage:
    """16UC1 (depth_scale metres per unit) or 32FC1 (metres), as a zero-copy view read in metres where used."""
    channels, dtype = check_image_layout(msg, DEPTH_LAYOUTS, max_pixels)
    return DepthImage.from_sensor(_view(msg, channels, dtype)[:, :, 0],
                                  msg.encoding.upper().replace("MONO16", "16UC1"), depth_scale=depth_scale)


def intrinsics_from_camera_info(msg: Any) -> CameraIntrinsics:
    """Raises ValueError for a CameraInfo that cannot project (CameraIntrinsics says why: zero focal length or
    size, non-finite values)."""
    return CameraIntrinsics.from_k(list(msg.k), msg.width, msg.height)
