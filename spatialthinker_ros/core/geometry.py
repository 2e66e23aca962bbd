"""Boxes from the model's image space to the camera's, and from camera pixels + depth to metres.

Conventions. Box corners are continuous pixel-edge coordinates: an image of width W spans [0, W], so a box
scales between resolutions by the plain size ratio. Intrinsics follow ROS CameraInfo / OpenCV, where the
centre of pixel column i is at u = i; a box edge coordinate x is therefore u = x - 0.5. 3D points are in
the camera optical frame (z forward, x right, y down), metres: X = (u - cx) * Z / fx, Y = (v - cy) * Z / fy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np

from spatialthinker_ros.core.types import Box, Position3D, SceneGraph

DEFAULT_DEPTH_SCALE = 0.001   # metres per unit of integer depth: millimetres, what depth cameras publish
_INTEGER_ENCODINGS = ("16UC1", "mono16")
_METRE_ENCODINGS = ("32FC1",)
_MAX_SAMPLES = 65536   # depth pixels read per box region; a strided sample is as good as all of them


def map_box(box: Box, from_size: tuple[int, int], to_size: tuple[int, int]) -> Optional[Box]:
    """The box in another resolution of the same image, clamped to it; None when nothing of it is inside."""
    (from_w, from_h), (to_w, to_h) = _checked_size(from_size), _checked_size(to_size)
    sx, sy = to_w / from_w, to_h / from_h
    x1, x2 = sorted((box.x_min * sx, box.x_max * sx))
    y1, y2 = sorted((box.y_min * sy, box.y_max * sy))
    mapped = Box(min(max(x1, 0.0), to_w), min(max(y1, 0.0), to_h), min(max(x2, 0.0), to_w), min(max(y2, 0.0), to_h))
    return mapped if mapped.width > 0 and mapped.height > 0 else None


def clamped_boxes(scene: SceneGraph) -> list[str]:
    """A note naming the objects whose boxes reach outside the scene's image, which map_box clamps to it (objects
    wholly outside are dropped by map_scene instead); empty when there are none. Nothing is lost, but a caller
    should know the box is not what the model said."""
    width, height = _checked_size(scene.image_size)
    clamped = [obj.id for obj in scene.objects
               if (obj.box.x_min < 0 or obj.box.y_min < 0 or obj.box.x_max > width or obj.box.y_max > height)
               and map_box(obj.box, scene.image_size, scene.image_size) is not None]
    if not clamped:
        return []
    boxes, were = ("boxes", "were") if len(clamped) > 1 else ("box", "was")
    return [f"{boxes} of {', '.join(clamped)} reached outside the {width}x{height} image and {were} clamped to it"]


def map_scene(scene: SceneGraph, to_size: tuple[int, int]) -> tuple[SceneGraph, list[str]]:
    """The scene with boxes in `to_size` pixels. Objects whose boxes fall outside (or are empty) are dropped,
    with the relations that name them, and reported."""
    objects, dropped = [], []
    for obj in scene.objects:
        box = map_box(obj.box, scene.image_size, to_size)
        if box is None:
            dropped.append(obj.id)
        else:
            objects.append(replace(obj, box=box))
    kept_ids = {o.id for o in objects}
    relations = tuple(r for r in scene.relations if r.subject in kept_ids and r.object in kept_ids)
    problems = []
    if dropped:
        removed = len(scene.relations) - len(relations)
        problems.append(
            f"objects dropped because their boxes are empty or outside the {scene.image_size[0]}x"
            f"{scene.image_size[1]} image: {', '.join(dropped)}"
            + (f" ({removed} relation{'s' if removed != 1 else ''} removed with them)" if removed else "")
        )
    return SceneGraph(objects=tuple(objects), relations=relations, image_size=tuple(to_size)), problems


@dataclass(frozen=True)
class CameraIntrinsics:
    """Pinhole intrinsics (pixels) of an image of `width` x `height` pixels; distortion is ignored."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def __post_init__(self) -> None:
        if not all(math.isfinite(v) for v in (self.fx, self.fy, self.cx, self.cy)):
            raise ValueError(f"camera intrinsics must be finite: {self}")
        if self.fx <= 0 or self.fy <= 0:
            raise ValueError(f"focal lengths must be positive (is the CameraInfo K all zeros?): {self}")
        _checked_size((self.width, self.height))

    @classmethod
    def from_k(cls, k: Sequence[float], width: int, height: int) -> "CameraIntrinsics":
        """From CameraInfo.k, the row-major 3x3 camera matrix."""
        if len(k) != 9:
            raise ValueError(f"K must have 9 elements (row-major 3x3), not {len(k)}")
        return cls(fx=float(k[0]), fy=float(k[4]), cx=float(k[2]), cy=float(k[5]), width=width, height=height)

    def scaled(self, width: int, height: int) -> "CameraIntrinsics":
        """The intrinsics of this image resized to width x height (pixel centres move by half a pixel)."""
        sx, sy = width / self.width, height / self.height
        return CameraIntrinsics(
            fx=self.fx * sx, fy=self.fy * sy,
            cx=(self.cx + 0.5) * sx - 0.5, cy=(self.cy + 0.5) * sy - 0.5,
            width=width, height=height,
        )


@dataclass(frozen=True, eq=False)
class DepthImage:
    """A depth image as the sensor sent it, read in metres only where it is used.

    The 3D lift reads a strided sample of each box, so converting the whole frame first would be wasted work
    (measured in bench/README.md, "The fast path"). `raw` is never written to, so it may be a view of a ROS
    message's buffer.
    """

    raw: np.ndarray   # H x W: integer units of `scale` metres, or float metres (scale 1)
    scale: float      # metres per unit of raw

    def __post_init__(self) -> None:
        if self.raw.ndim != 2:
            raise ValueError(f"a depth image must be H x W, not of shape {self.raw.shape}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"depth_scale must be positive and finite, not {self.scale}")

    @classmethod
    def from_sensor(cls, depth: np.ndarray, encoding: str, depth_scale: Optional[float] = None) -> "DepthImage":
        """16UC1 / mono16 are millimetres unless `depth_scale` (metres per unit) says otherwise, for sensors that
        use another unit; 32FC1 is metres (REP 118) whatever depth_scale says, so one setting serves both."""
        if encoding in _INTEGER_ENCODINGS:
            scale = DEFAULT_DEPTH_SCALE if depth_scale is None else depth_scale
        elif encoding in _METRE_ENCODINGS:
            scale = 1.0
        else:
            raise ValueError(
                f"unsupported depth encoding {encoding!r}; expected one of "
                f"{', '.join(_INTEGER_ENCODINGS + _METRE_ENCODINGS)}"
            )
        if depth.ndim == 3 and depth.shape[2] == 1:
            depth = depth[:, :, 0]
        return cls(depth, scale)

    @classmethod
    def from_metres(cls, metres: np.ndarray) -> "DepthImage":
        return cls.from_sensor(metres, "32FC1")

    @property
    def shape(self) -> tuple[int, int]:
        return self.raw.shape

    def metres(self, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
        """raw[rows, cols] in metres as a new float32 array, NaN where the sensor had no reading (0, negative,
        NaN, inf)."""
        metres = self.raw[rows, cols].astype(np.float32)
        metres *= np.float32(self.scale)
        metres[~(np.isfinite(metres) & (metres > 0))] = np.nan
        return metres


def lift_box(
    box: Box,
    depth: DepthImage,
    intrinsics: CameraIntrinsics,
    image_size: tuple[int, int],
    min_valid_fraction: float = 0.05,
    max_depth: float = 20.0,
    shrink: float = 0.5,
) -> Optional[Position3D]:
    """Where the object in `box` is, in metres, or None when the depth inside the box is too sparse.

    Assumptions: `box` is in pixels of the colour image of `image_size`; the depth image is registered to
    that colour image (same viewpoint and field of view, e.g. aligned_depth_to_color) but may have another
    resolution, so the box is mapped to it by the size ratio. `intrinsics` describe the image of
    intrinsics.width x intrinsics.height (normally the CameraInfo paired with the depth image) and are
    scaled to the depth image's size when that differs.

    Robustness: the surface depth is the median of the valid depths in the central `shrink` fraction of the
    box (in each direction), which keeps the background that boxes include at their edges out of it; at
    least `min_valid_fraction` of that region must be valid (finite, 0 < d <= max_depth). The depth extent is
    the 10th-90th percentile spread of the whole box, capped at the smaller of the metric width and height
    because the whole box also sees background. The returned centre lies half that extent behind the
    visible surface; x/y sizes are the box back-projected at the surface depth.
    """
    if not 0 < shrink <= 1:
        raise ValueError(f"shrink must be in (0, 1], not {shrink}")
    depth_h, depth_w = depth.shape
    mapped = map_box(box, image_size, (depth_w, depth_h))
    if mapped is None:
        return None
    k = intrinsics
    if (k.width, k.height) != (depth_w, depth_h):
        k = k.scaled(depth_w, depth_h)

    inner_region = _sampled_region(depth, _shrunk(mapped, shrink))
    inner = _valid(inner_region, max_depth)
    if inner.size == 0 or inner.size < min_valid_fraction * inner_region.size:
        return None
    surface = float(np.median(inner))
    whole = _valid(_sampled_region(depth, mapped), max_depth)
    p10, p90 = np.percentile(whole if whole.size else inner, (10, 90))
    size_x = mapped.width * surface / k.fx
    size_y = mapped.height * surface / k.fy
    size_z = min(float(p90 - p10), size_x, size_y)
    z = surface + size_z / 2
    u = (mapped.x_min + mapped.x_max) / 2 - 0.5
    v = (mapped.y_min + mapped.y_max) / 2 - 0.5
    return Position3D(
        x=(u - k.cx) * z / k.fx, y=(v - k.cy) * z / k.fy, z=z, size_x=size_x, size_y=size_y, size_z=size_z
    )


def _checked_size(size: tuple[int, int]) -> tuple[int, int]:
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, not {width} x {height}")
    return width, height


def _shrunk(box: Box, shrink: float) -> Box:
    dx, dy = box.width * (1 - shrink) / 2, box.height * (1 - shrink) / 2
    return Box(box.x_min + dx, box.y_min + dy, box.x_max - dx, box.y_max - dy)


def _pixel_span(lo: float, hi: float, limit: int) -> tuple[int, int]:
    """Indices [start, stop) of the pixels whose centres lie in [lo, hi]; at least one pixel."""
    start = min(max(math.ceil(lo - 0.5), 0), limit - 1)
    stop = min(max(math.floor(hi - 0.5) + 1, start + 1), limit)
    return start, stop


def _sampled_region(depth: DepthImage, box: Box) -> np.ndarray:
    """The box's depths in metres, strided to at most ~_MAX_SAMPLES: only the sampled pixels are converted."""
    rows = _pixel_span(box.y_min, box.y_max, depth.shape[0])
    cols = _pixel_span(box.x_min, box.x_max, depth.shape[1])
    step = max(1, math.ceil(math.sqrt((rows[1] - rows[0]) * (cols[1] - cols[0]) / _MAX_SAMPLES)))
    return depth.metres(slice(*rows, step), slice(*cols, step))


def _valid(depths: np.ndarray, max_depth: float) -> np.ndarray:
    """The readings to trust, flattened (NaN compares false, so it drops out here too)."""
    return depths[(depths > 0) & (depths <= max_depth)]
