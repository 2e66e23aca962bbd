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

from spatialthinker_ros.core.depth_layers import (CENTRAL, DEPTH_NOISE_PER_M, ZONES_PER_AXIS, choose_layer, depth_layers,
                                                 line_zones)
from spatialthinker_ros.core.types import Box, Position3D, SceneGraph

DEFAULT_DEPTH_SCALE = 0.001   # metres per unit of integer depth: millimetres, what depth cameras publish
_INTEGER_ENCODINGS = ("16UC1", "mono16")
_METRE_ENCODINGS = ("32FC1",)
_MAX_SAMPLES = 12000   # depth pixels read per box; a strided sample is as good as all of them
_FLOAT_STEP = DEFAULT_DEPTH_SCALE   # metres: the finest depth bin of 32FC1 frames, most often millimetre depth
                                    # converted to metres (depth_image_proc), so up close they read like 16UC1
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

    @property
    def step(self) -> float:
        """Metres between two readings the sensor can give: `scale` for integer depth; _FLOAT_STEP for 32FC1."""
        return self.scale if np.issubdtype(self.raw.dtype, np.integer) else _FLOAT_STEP

    def metres(self, rows: slice | np.ndarray = slice(None), cols: slice | np.ndarray = slice(None)) -> np.ndarray:
        """raw[rows, cols] (slices, or index arrays that broadcast) in metres as a new float32 array, NaN where the sensor had no reading (0, negative,
        NaN, inf)."""
        metres = self.raw[rows, cols].astype(np.float32)
        metres *= np.float32(self.scale)
        metres[~(np.isfinite(metres) & (metres > 0))] = np.nan
        return metres


@dataclass(frozen=True)
class LiftConfig:
    """How lift_box reads a box's depth. Depths outside [min_depth_m, max_depth_m] are invalid, like the sensor's
    0 and NaN: the minimum sits below a wrist camera's (RealSense D405) 7 cm and the maximum beyond any indoor
    wall. At least `min_valid_fraction` of the box's central `shrink` region (in each direction) must be valid."""

    min_valid_fraction: float = 0.05
    min_depth_m: float = 0.05
    max_depth_m: float = 20.0
    shrink: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.min_valid_fraction <= 1:
            raise ValueError(f"min_valid_fraction must be in (0, 1], not {self.min_valid_fraction}")
        if not (math.isfinite(self.min_depth_m) and self.min_depth_m > 0):
            raise ValueError(f"min_depth must be positive and finite, not {self.min_depth_m}")
        if not (math.isfinite(self.max_depth_m) and self.max_depth_m > self.min_depth_m):
            raise ValueError(f"max_depth must be finite and above min_depth ({self.min_depth_m} m), "
                             f"not {self.max_depth_m}")
        if not 0 < self.shrink <= 1:
            raise ValueError(f"shrink must be in (0, 1], not {self.shrink}")


def box_in_depth(box: Box, depth: DepthImage, intrinsics: CameraIntrinsics,
                 image_size: tuple[int, int]) -> Optional[tuple[Box, CameraIntrinsics]]:
    """`box` (pixels of an image of `image_size`) in the depth image's pixels, with the intrinsics at the depth
    image's resolution; None when nothing of the box lies inside the image."""
    depth_h, depth_w = depth.shape
    mapped = map_box(box, image_size, (depth_w, depth_h))
    if mapped is None:
        return None
    if (intrinsics.width, intrinsics.height) != (depth_w, depth_h):
        intrinsics = intrinsics.scaled(depth_w, depth_h)
    return mapped, intrinsics


def lift_box(
    box: Box,
    depth: DepthImage,
    intrinsics: CameraIntrinsics,
    image_size: tuple[int, int],
    config: LiftConfig = LiftConfig(),
    depth_noise_per_m: float = DEPTH_NOISE_PER_M,
) -> Optional[Position3D]:
    """Where the object in `box` is, in metres, or None when the depth inside the box is too sparse.

    Assumptions: `box` is in pixels of the colour image of `image_size`; the depth image is registered to
    that colour image (same viewpoint and field of view, e.g. aligned_depth_to_color) but may have another
    resolution, so the box is mapped to it by the size ratio. `intrinsics` describe the image of
    intrinsics.width x intrinsics.height (normally the CameraInfo paired with the depth image) and are
    scaled to the depth image's size when that differs.

    A model's box is loose: besides the object it holds the background and sometimes a nearer object. The box's
    depth is read as a set of surfaces (depth_layers), one is chosen as the object's (choose_layer), and
    everything returned comes from that surface alone, so the depth is never a value between two surfaces:

    - the surface depth is the median of the layer's depths; the centre lies half the layer's depth extent (its
      10th-90th percentile range, capped at the smaller metric width and height) behind it;
    - x/y are the centre of the layer's pixel extent (its 1st-99th percentile span of columns and rows)
      back-projected at the surface depth, and the sizes that extent back-projected there;
    - depth_spread is the layer's depth spread, and ambiguous says whether another surface could as well have been
      the object (choose_layer).

    Valid depths lie in [config.min_depth_m, config.max_depth_m] (LiftConfig), and the layers are found on at most
    depth_layers.MAX_BINS bins, so a box costs bounded time and memory whatever the frame holds
    (docs/reliability-and-security.md).
    """
    shrink = config.shrink
    in_depth = box_in_depth(box, depth, intrinsics, image_size)
    if in_depth is None:
        return None
    mapped, k = in_depth
    region, rows, cols = _sampled_grid(depth, mapped)
    # Each sampled line's place in the box: -1 at the left/top edge, +1 at the right/bottom edge (a box narrower
    # than a pixel is read as one pixel wide).
    col_zones = line_zones(((cols + 0.5) - (mapped.x_min + mapped.x_max) / 2) / max(mapped.width / 2, 0.5), shrink)
    row_zones = line_zones(((rows + 0.5) - (mapped.y_min + mapped.y_max) / 2) / max(mapped.height / 2, 0.5), shrink)
    if not (col_zones & CENTRAL).any() or not (row_zones & CENTRAL).any():   # thinner than the sampling step
        col_zones, row_zones = col_zones | CENTRAL, row_zones | CENTRAL
    valid = (region >= config.min_depth_m) & (region <= config.max_depth_m)    # NaN compares false
    central_valid = int(valid[np.ix_(row_zones & CENTRAL > 0, col_zones & CENTRAL > 0)].sum())
    central_total = int((row_zones & CENTRAL > 0).sum()) * int((col_zones & CENTRAL > 0).sum())
    if central_valid == 0 or central_valid < config.min_valid_fraction * central_total:
        return None
    row_of, col_of = np.nonzero(valid)
    depths = region[row_of, col_of]
    layers = depth_layers(depths, depth.step, depth_noise_per_m)
    zones = row_zones[row_of] * ZONES_PER_AXIS + col_zones[col_of]
    choice = choose_layer(layers, zones)
    mine = layers.labels == choice.layer
    surface_depths = np.sort(depths[mine])
    p10, p16, surface, p84, p90 = (float(surface_depths[int(q * (surface_depths.size - 1) + 0.5)])
                                   for q in (0.1, 0.16, 0.5, 0.84, 0.9))
    col_lo, col_hi = _pixel_extent(np.bincount(col_of[mine], minlength=cols.size), cols)
    row_lo, row_hi = _pixel_extent(np.bincount(row_of[mine], minlength=rows.size), rows)
    size_x = (col_hi - col_lo) * surface / k.fx
    size_y = (row_hi - row_lo) * surface / k.fy
    size_z = min(p90 - p10, size_x, size_y)
    z = surface + size_z / 2
    u = (col_lo + col_hi) / 2 - 0.5     # the span's pixel-edge centre, as a pixel-centre coordinate
    v = (row_lo + row_hi) / 2 - 0.5
    return Position3D(
        x=(u - k.cx) * z / k.fx, y=(v - k.cy) * z / k.fy, z=z, size_x=size_x, size_y=size_y, size_z=size_z,
        depth_spread=(p84 - p16) / 2, ambiguous=choice.ambiguous,
    )


def _checked_size(size: tuple[int, int]) -> tuple[int, int]:
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, not {width} x {height}")
    return width, height


def _pixel_span(lo: float, hi: float, limit: int) -> tuple[int, int]:
    """Indices [start, stop) of the pixels whose centres lie in [lo, hi]; at least one pixel."""
    start = min(max(math.ceil(lo - 0.5), 0), limit - 1)
    stop = min(max(math.floor(hi - 0.5) + 1, start + 1), limit)
    return start, stop


def _sampled_grid(depth: DepthImage, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The box's depths in metres at about _MAX_SAMPLES pixels (only those are converted), with the row and column
    index of each sampled line."""
    rows = _pixel_span(box.y_min, box.y_max, depth.shape[0])
    cols = _pixel_span(box.x_min, box.x_max, depth.shape[1])
    step = max(1, math.ceil(math.sqrt((rows[1] - rows[0]) * (cols[1] - cols[0]) / _MAX_SAMPLES)))
    row_lines, col_lines = _sample_lines(*rows, step), _sample_lines(*cols, step)
    region = depth.metres(row_lines[:, None], col_lines[None, :])
    return region, row_lines, col_lines


def _sample_lines(start: int, stop: int, step: int) -> np.ndarray:
    """About (stop - start) / step indices in [start, stop), both ends included, placed symmetrically: the lines
    sampled in a mirrored image are the mirror images of these, so a mirrored scene is measured alike."""
    length = stop - start
    count = min(length, math.ceil(length / step))
    if count % 2 and (length - 1) % 2:   # an odd count would put the middle line off the box's centre
        count = min(length, count + 1)
    if count == length:
        return np.arange(start, stop)
    if count == 1:                       # an odd length here: its middle pixel
        return np.array([start + (length - 1) // 2])
    offsets = np.arange((count + 1) // 2) * (length - 1) // (count - 1)   # the first half, from the start
    return np.concatenate([start + offsets, (stop - 1 - offsets[: count // 2])[::-1]])


def _pixel_extent(per_line: np.ndarray, lines: np.ndarray) -> tuple[float, float]:
    """Pixel-edge span [lo, hi) of a layer from its sample count per sampled line, leaving out a stray 1 % at either
    end (counted alike from both ends, so a mirrored layer gets the mirrored span). A sampled line stands for the
    pixels nearer to it than to the next line; the first and last lines for the box's edges too."""
    hundredfold = np.cumsum(per_line) * 100                  # integers: the same cut from either end
    total = int(hundredfold[-1]) // 100
    first = int(np.searchsorted(hundredfold, total, side="left"))           # the first line reaching 1 %
    last = int(np.searchsorted(hundredfold, 99 * total, side="right"))      # the first line past 99 %
    lo = float(lines[first]) if first == 0 else (lines[first - 1] + lines[first] + 1) / 2
    hi = float(lines[last]) + 1 if last == lines.size - 1 else (lines[last] + lines[last + 1] + 1) / 2
    return float(lo), float(hi)
