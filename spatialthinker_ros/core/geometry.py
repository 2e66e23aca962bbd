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
_MAX_SAMPLES = 12000   # depth pixels read per box; a strided sample is as good as all of them
DEPTH_NOISE_PER_M = 0.005   # sigma_z = k * z^2: stereo / structured-light noise, about RealSense D4xx class
# The depth layers of a box and the choice among them (choose_layer says how they are used).
_MIN_BIN_WIDTH = 1e-4   # 1/m: the 1/z bin width when the noise model is switched off (per_m = 0)
_FLOAT_STEP = DEFAULT_DEPTH_SCALE   # metres: the finest depth bin of 32FC1 frames, most often millimetre depth
                                    # converted to metres (depth_image_proc), so up close they read like 16UC1
_MAX_BINS = 1 << 16     # depth bins per box whatever the depths and settings: bounds each box's cost
_SPARSE_BIN = 0.002     # share of a box's samples below which a depth bin counts as empty
_GAP_BINS = 2           # empty depth bins in a row (noise sigmas or sensor steps) that separate two layers: one is
                        # not enough where a steep surface is sampled sparsely (a table seen from above, a strided
                        # 1080p box)
_COMB_BINS = 8          # the longest empty run that a sparsely sampled steep surface leaves inside itself (_comb)
_VALLEY = 0.5           # a depth bin this far below the surfaces on both sides separates them ...
_PEAK = 0.01            # ... when each holds at least this share of the samples in one bin
_CLEAR_SHARE = 0.25     # share of the central region's valid samples that makes a layer a candidate
_CORE = 0.4             # the centre core: this fraction of the central region, in each direction
_CENTRE_SHARE = 1 / 3   # share of the core's valid samples that means a layer reaches the centre
_ENCLOSE_SHARE = 0.1    # share of each quadrant's valid samples that a layer enclosing the centre holds
_AMBIGUOUS_RATIO = 0.6  # a rival holding this much of the chosen layer's share makes the choice a guess
_NEARER_SHARE = 0.1     # share of the central region that makes a layer in front of the chosen one a thing of its
                        # own: a bottle covering 6 % of a loose box holds that much once it reaches into the box's
                        # middle; an occluder at the box's edge (a chair leg, a gripper finger) and stray mixed
                        # pixels hold none of it. Under the 25 % a candidate needs: nothing in front passes unmarked


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


def depth_noise(z: float | np.ndarray, per_m: float = DEPTH_NOISE_PER_M) -> float | np.ndarray:
    """One standard deviation of the depth noise at range `z` metres (float or array): per_m * z^2, the model of
    stereo and structured-light cameras (per_m = subpixel disparity error / (focal length x baseline); the source
    and a D405's figures are in bench/README.md). In inverse depth (1/z) that noise is the constant per_m. Up close
    it falls below the sensor's step (a millimetre of 16UC1 below about 0.45 m at the default), which is then the
    finest depth that can be told apart: depth_layers bins depth by the larger of the two."""
    return per_m * z * z


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
    _MAX_BINS bins, so a box costs bounded time and memory whatever the frame holds (docs/reliability-and-security.md).
    """
    shrink = config.shrink
    in_depth = box_in_depth(box, depth, intrinsics, image_size)
    if in_depth is None:
        return None
    mapped, k = in_depth
    region, rows, cols = _sampled_grid(depth, mapped)
    # Each sampled line's place in the box: -1 at the left/top edge, +1 at the right/bottom edge (a box narrower
    # than a pixel is read as one pixel wide).
    col_zones = _line_zones(((cols + 0.5) - (mapped.x_min + mapped.x_max) / 2) / max(mapped.width / 2, 0.5), shrink)
    row_zones = _line_zones(((rows + 0.5) - (mapped.y_min + mapped.y_max) / 2) / max(mapped.height / 2, 0.5), shrink)
    if not (col_zones & _CENTRAL).any() or not (row_zones & _CENTRAL).any():   # thinner than the sampling step
        col_zones, row_zones = col_zones | _CENTRAL, row_zones | _CENTRAL
    valid = (region >= config.min_depth_m) & (region <= config.max_depth_m)    # NaN compares false
    central_valid = int(valid[np.ix_(row_zones & _CENTRAL > 0, col_zones & _CENTRAL > 0)].sum())
    central_total = int((row_zones & _CENTRAL > 0).sum()) * int((col_zones & _CENTRAL > 0).sum())
    if central_valid == 0 or central_valid < config.min_valid_fraction * central_total:
        return None
    row_of, col_of = np.nonzero(valid)
    depths = region[row_of, col_of]
    layers = depth_layers(depths, depth_noise_per_m, depth.step)
    zones = row_zones[row_of] * _ZONES_PER_AXIS + col_zones[col_of]
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


@dataclass(frozen=True)
class DepthLayers:
    """The surfaces in a set of depth samples: runs of occupied depth bins, each as wide as the finest depth the
    sensor tells apart at its range (_depth_bins), split where at least _GAP_BINS bins in a row are empty (a gap
    clearly larger than the noise or the sensor's step there) or at the bottom of a valley between two surfaces a
    few sigmas apart (_valleys). Layer 0 is the nearest."""

    labels: np.ndarray   # per sample: its layer, or -1 for a sample in a sparse bin (no surface)
    count: int           # number of layers


def _depth_bins(depths: np.ndarray, noise_per_m: float, step: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Each depth's bin (0 holds the nearest; at most _MAX_BINS), the samples per bin, and how many of the nearest
    bins are one `step` wide.

    A bin is as wide as the larger of one noise sigma (noise_per_m * z^2: constant in 1/z) and the sensor's step
    (metres between readings; constant in z), so up close each reading of a 16UC1 frame is a bin of its own and
    neighbouring readings are neighbouring bins: a tilted surface stays one run, and an empty run is a whole step
    or more. The bin coordinate is the integral of 1/width: z / step below the range where the two widths meet,
    1/z / noise beyond it. A reading stands for the step around it, and is counted in the bins that step overlaps,
    so bins a little wider than a step do not hold one reading and two by turns (a comb that would pass for
    valleys between surfaces)."""
    per_m = max(noise_per_m, _MIN_BIN_WIDTH)
    meet = math.sqrt(step / per_m)                   # per_m * meet^2 == step

    def coordinate(z: np.ndarray) -> np.ndarray:
        return np.where(z <= meet, z / step, meet / step + (1 / meet - np.reciprocal(z)) / per_m)

    z = depths.astype(np.float64)
    centre, near, far = coordinate(z), coordinate(np.maximum(z - step / 2, z / 2)), coordinate(z + step / 2)
    nearest = float(centre.min())
    scale = min(1.0, (_MAX_BINS - 1) / max(float(centre.max()) - nearest, 1.0))   # wider bins, not more of them
    bins = ((centre - nearest) * scale + 0.5).astype(np.int64)       # readings a step apart: a bin apart
    near, far = (near - nearest) * scale + 0.5, (far - nearest) * scale + 0.5
    first = np.clip(np.floor(near), 0, bins.max()).astype(np.int64)
    in_first = np.clip((np.minimum(far, first + 1) - near) / np.maximum(far - near, 1e-12), 0.0, 1.0)
    size = int(bins.max()) + 2
    counts = (np.bincount(first, in_first, size) + np.bincount(first + 1, 1 - in_first, size))[:size - 1]
    return bins, counts, int(max(0.0, (meet / step - nearest) * scale) + 0.5)


def depth_layers(depths: np.ndarray, noise_per_m: float = DEPTH_NOISE_PER_M, step: float = _FLOAT_STEP) -> DepthLayers:
    """The surfaces among `depths` (metres, all valid; `step` > 0: metres between the sensor's readings).
    A bin holding fewer than _SPARSE_BIN of the samples counts as empty, so isolated readings (mixed pixels at
    edges, speckle) neither bridge two surfaces nor form one; the samples in empty and valley bins belong to no
    layer."""
    bins, counts, stepped = _depth_bins(depths, noise_per_m, step)
    if counts.max() < _SPARSE_BIN * depths.size:     # readings scattered over every range: no surface stands out
        return DepthLayers(labels=np.zeros(depths.size, np.int64), count=1)
    valley = _valleys(counts, depths.size)
    valley[:stepped] = False     # where the noise is finer than a step, no two surfaces' noise tails overlap
    occupied = np.flatnonzero((counts >= max(1.0, _SPARSE_BIN * depths.size)) & ~valley)
    valleys_before = np.cumsum(valley)[occupied]
    gaps = np.diff(occupied) - 1                                  # empty bins between neighbouring occupied ones
    starts = np.concatenate(([True], (gaps > _GAP_BINS) & ~_comb(gaps) | (np.diff(valleys_before) > 0)))
    first, last = occupied[starts], occupied[np.concatenate((starts[1:], [True]))]
    every_bin = np.arange(counts.size)
    layer = np.searchsorted(first, every_bin, side="right") - 1
    layer_of_bin = np.where((layer >= 0) & (every_bin <= last[layer]), layer, -1)
    return DepthLayers(labels=layer_of_bin[bins], count=int(first.size))


def _comb(gaps: np.ndarray) -> np.ndarray:
    """Which runs of empty bins lie inside a comb: a steep surface sampled sparsely (a can's side near its outline,
    seen up close) fills one bin per sampled line with a few empty ones between, widening gradually. A run there is
    at most _COMB_BINS long and at most _GAP_BINS plus twice a neighbouring run, where a gap between two surfaces
    follows a run inside one (none at all on a flat, noisy or tilted surface)."""
    at = np.arange(gaps.size)
    empty = gaps > 0
    before = np.maximum.accumulate(np.where(empty, at, -1))            # the nearest empty run at or before each
    after = np.minimum.accumulate(np.where(empty, at, gaps.size)[::-1])[::-1]
    previous = np.where(before[:-1] >= 0, gaps[np.maximum(before[:-1], 0)], 0) if gaps.size else gaps
    following = np.where(after[1:] < gaps.size, gaps[np.minimum(after[1:], gaps.size - 1)], 0) if gaps.size else gaps
    neighbour = np.maximum(np.concatenate(([0], previous)), np.concatenate((following, [0])))
    return (gaps <= _COMB_BINS) & (gaps <= _GAP_BINS + 2 * neighbour)


def _valleys(counts: np.ndarray, total: int) -> np.ndarray:
    """The depth bins at the bottom of a valley between two surfaces whose noise tails overlap (a few sigmas apart, no
    empty bin between them): a local minimum of the smoothed counts below _VALLEY of the lower of the highest counts
    on either side within its run of occupied bins, both of those substantial (_PEAK of all samples). The smoothing over
    5 bins keeps what is left of the comb millimetre depth makes in bins a little wider than a millimetre from
    passing for valleys."""
    padded = np.concatenate(([0, 0], counts, [0, 0])).astype(np.float64)
    smooth = (3 * counts + 2 * (padded[1:-3] + padded[3:-1]) + padded[:-4] + padded[4:]) / 9   # 1-2-3-2-1
    # the highest counts on either side within the bin's run: a run ends at more than _GAP_BINS sparse bins in a row,
    # so a far wall never makes the dips of a nearer surface's tail (a steep side sampled line by line) valleys
    edges = np.diff(np.concatenate(([0], counts < max(1.0, _SPARSE_BIN * total), [0])).astype(np.int8))
    sparse_from, sparse_to = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    long_gap_ends = np.zeros(counts.size + 1, bool)
    long_gap_ends[sparse_to[sparse_to - sparse_from > _GAP_BINS]] = True
    run = np.cumsum(long_gap_ends[:-1])
    offset = run * (smooth.max() + 1)                                   # later runs rank above earlier ones
    left = np.maximum.accumulate(smooth + offset) - offset
    back = run[::-1].max() - run[::-1] if run.size else run
    right = (np.maximum.accumulate(smooth[::-1] + back * (smooth.max() + 1)) - back * (smooth.max() + 1))[::-1]
    lower_peak = np.minimum(left, right)
    padded = np.concatenate(([np.inf], smooth, [np.inf]))
    bottom = (smooth <= padded[:-2]) & (smooth <= padded[2:])
    return bottom & (smooth < _VALLEY * lower_peak) & (lower_peak >= _PEAK * total)


@dataclass(frozen=True)
class LayerChoice:
    layer: int           # index into DepthLayers (0 = nearest)
    ambiguous: bool      # another surface of similar share could as well be the object


# Zones of a box, per axis (columns and rows alike): bit 1 the right/lower half, bit 8 the left/upper half (a line
# on the centre line is in both, so a mirrored box's zones are the mirror images), bit 2 the central `shrink`
# region, bit 4 the centre core. A sample's zone is row_zone * _ZONES_PER_AXIS + column_zone.
_HIGH_HALF, _CENTRAL, _CORE_ZONE, _LOW_HALF = 1, 2, 4, 8
_ZONES_PER_AXIS = 16
_ZONE_ROW, _ZONE_COL = np.divmod(np.arange(_ZONES_PER_AXIS ** 2), _ZONES_PER_AXIS)
_IN_CENTRAL = (_ZONE_ROW & _CENTRAL > 0) & (_ZONE_COL & _CENTRAL > 0)
_IN_CORE = (_ZONE_ROW & _CORE_ZONE > 0) & (_ZONE_COL & _CORE_ZONE > 0)
_IN_QUADRANT = [(_ZONE_COL & col_half > 0) & (_ZONE_ROW & row_half > 0)
                for col_half in (_LOW_HALF, _HIGH_HALF) for row_half in (_LOW_HALF, _HIGH_HALF)]


def _line_zones(place: np.ndarray, shrink: float) -> np.ndarray:
    """The zone bits of sampled lines at `place` (-1 at one edge of the box, +1 at the other)."""
    distance = np.abs(place)
    return ((place >= 0) * _HIGH_HALF + (place <= 0) * _LOW_HALF + (distance <= shrink) * _CENTRAL
            + (distance <= _CORE * shrink) * _CORE_ZONE).astype(np.int64)


def choose_layer(layers: DepthLayers, zones: np.ndarray) -> LayerChoice:
    """The object's surface among the layers of a box, from each sample's zone in the box (see _line_zones).

    Candidates hold a clear share (_CLEAR_SHARE) of the central region's samples, or enclose the centre (a ring,
    a mug's rim: present in all four quadrants). Among them the nearest that reaches the centre (holds
    _CENTRE_SHARE of the centre core's samples, or encloses it) wins; when none does, the nearest candidate;
    when no layer is a candidate, the largest. So a thin occluder at the box's edge, which holds little of the
    central region and not its centre, never wins. The choice is ambiguous when another layer holds a similar
    share (at least _AMBIGUOUS_RATIO of the chosen one's, of the central region or of the whole box), unless it
    is only a farther background around the chosen one, or is neither a candidate nor nearer. It is ambiguous too
    when a layer in front of the chosen one holds _NEARER_SHARE of the central region: a small object in front of
    the surface the box is centred on (a bottle before a wall) may be the object, so the position is marked rather
    than silently the wall's.
    """
    n = max(layers.count, 1)
    zone_count = _ZONES_PER_AXIS ** 2
    counts = np.bincount((layers.labels + 1) * zone_count + zones, minlength=(n + 1) * zone_count)
    counts = counts.reshape(n + 1, zone_count)                      # row 0: samples in no layer
    totals = counts.sum(axis=0)

    def shares(in_zone: np.ndarray) -> np.ndarray:
        return counts[1:, in_zone].sum(axis=1) / max(int(totals[in_zone].sum()), 1)

    box_share, central_share = shares(np.ones(zone_count, bool)), shares(_IN_CENTRAL)
    core_share = shares(_IN_CORE)
    quadrants = np.stack([shares(in_quadrant) for in_quadrant in _IN_QUADRANT], axis=1)
    quadrant_seen = np.array([totals[in_quadrant].sum() > 0 for in_quadrant in _IN_QUADRANT])
    encloses = np.all((quadrants >= _ENCLOSE_SHARE) | ~quadrant_seen, axis=1) & (box_share > 0)
    candidate = (central_share >= _CLEAR_SHARE) | encloses
    reaches = candidate & ((core_share >= _CENTRE_SHARE) | encloses)
    if reaches.any():
        chosen = int(np.argmax(reaches))                           # layers are ordered nearest first
    elif candidate.any():
        chosen = int(np.argmax(candidate))
    else:
        chosen = int(np.argmax(box_share)) if layers.count else 0
    order = np.arange(n)
    similar = ((central_share >= _AMBIGUOUS_RATIO * central_share[chosen])
               | (box_share >= _AMBIGUOUS_RATIO * box_share[chosen]))
    rivals = similar & (candidate | (order < chosen)) & (order != chosen) & (box_share > 0)
    background = (order > chosen) & encloses
    nearer = (order < chosen) & (central_share >= _NEARER_SHARE)
    return LayerChoice(layer=chosen, ambiguous=bool(np.any(rivals & ~background) or np.any(nearer)))


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
