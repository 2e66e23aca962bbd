"""Image and depth files named on a command line (spatialthinker-ask, spatialthinker_camera), read under the node's
request rules: a file whose header declares too many pixels is refused before it is decoded."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from spatialthinker_ros.cli_options import UsageError
from spatialthinker_ros.core.geometry import CameraIntrinsics, DepthImage
from spatialthinker_ros.core.images import decode_quietly, decode_rgb
from spatialthinker_ros.core.request import ImageError, depth_aspect_mismatch, request_image_error


def _read_bytes(path: Path, what: str) -> bytes:
    if not path.exists():
        raise UsageError(f"{what} file {path} does not exist")
    if not path.is_file():
        raise UsageError(f"{what} file {path} is not a regular file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    if not data:
        raise UsageError(f"{what} file {path} is empty")
    return data


def read_image(path: Path, max_pixels: int) -> np.ndarray:
    """RGB uint8 HxWx3 (OpenCV reads BGR; grey and 16-bit images are converted). A file whose header declares
    over `max_pixels` is refused before it is decoded."""
    try:
        rgb = decode_rgb(_read_bytes(path, "image"), max_pixels)
    except ImageError as exc:   # refused as the node refuses a request image of that size
        raise request_image_error(exc) from None
    if rgb is None:
        raise UsageError(f"cannot decode image file {path}: corrupt, or not a format OpenCV reads "
                         "(PNG, JPEG, BMP, TIFF, WebP, ...)")
    return rgb


def read_depth(path: Path, depth_scale: float, max_pixels: int) -> DepthImage:
    """The depth of a 16-bit image (units of depth_scale metres) or a .npy array (float: metres)."""
    if path.suffix.lower() == ".npy":
        _read_bytes(path, "depth")
        try:   # mapped, not read: its shape is checked before any of it is loaded
            depth = np.load(path, allow_pickle=False, mmap_mode="r")
        except (ValueError, OSError, EOFError) as exc:
            raise UsageError(f"cannot load depth file {path} as a numpy array: {exc}") from None
        if depth.ndim >= 2 and depth.shape[0] * depth.shape[1] > max_pixels:
            raise UsageError(f"depth file {path}: array of {depth.shape[1]}x{depth.shape[0]} exceeds the "
                             f"{max_pixels}-pixel limit")
        depth = np.asarray(depth)
    else:
        try:
            depth = decode_quietly(_read_bytes(path, "depth"), cv2.IMREAD_UNCHANGED, max_pixels=max_pixels)
        except ImageError as exc:
            raise UsageError(f"depth file {path}: {exc}") from None
        if depth is None:
            raise UsageError(f"cannot decode depth file {path}: corrupt, or not a 16-bit PNG/TIFF or .npy")
    if depth.ndim == 3 and depth.shape[2] == 1:
        depth = depth[:, :, 0]
    if depth.ndim != 2 or depth.size == 0:
        raise UsageError(f"depth file {path} must hold one channel (H x W), not shape {depth.shape}")
    if np.issubdtype(depth.dtype, np.floating):
        encoding = "32FC1"                                   # metres, as ROS 32FC1
    elif depth.dtype == np.uint8:
        raise UsageError(f"depth file {path} is 8-bit, which cannot hold depth: use a 16-bit PNG (millimetres "
                         "by default) or a float .npy in metres")
    elif np.issubdtype(depth.dtype, np.integer):
        encoding = "16UC1"                                   # units of depth_scale
    else:
        raise UsageError(f"depth file {path} has unsupported type {depth.dtype}")
    try:
        return DepthImage.from_sensor(depth, encoding, depth_scale=depth_scale)
    except ValueError as exc:
        raise UsageError(f"--depth-scale: {exc}") from None


def read_depth_and_intrinsics(
    args: argparse.Namespace, image_size: tuple[int, int], max_pixels: int
) -> tuple[Optional[DepthImage], Optional[CameraIntrinsics]]:
    given = {name: getattr(args, name) for name in ("fx", "fy", "cx", "cy") if getattr(args, name) is not None}
    if args.depth is None:
        if given:
            raise UsageError(f"--{', --'.join(given)} given without --depth; intrinsics are only used with depth")
        return None, None
    missing = [name for name in ("fx", "fy", "cx", "cy") if name not in given]
    if missing:
        raise UsageError(f"--depth needs the camera intrinsics: --{' --'.join(missing)} missing")
    depth = read_depth(args.depth, args.depth_scale, max_pixels)
    width, height = image_size
    mismatch = depth_aspect_mismatch(image_size, (depth.shape[1], depth.shape[0]))
    if mismatch:
        raise UsageError(f"{mismatch}: it must be registered to the colour image (same field of view)")
    try:
        intrinsics = CameraIntrinsics(fx=given["fx"], fy=given["fy"], cx=given["cx"], cy=given["cy"],
                                      width=width, height=height)
    except ValueError as exc:
        raise UsageError(exc) from None
    return depth, intrinsics

