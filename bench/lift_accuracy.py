"""How well a loose box's depth gives the object's 3D position: the layered lift against the old median-of-the-centre.

    .venv/bin/python -m bench.lift_accuracy
    .venv/bin/python -m bench.lift_accuracy --quick        # a few scenes per kind (the smoke test uses it)

Renders depth scenes with known geometry (640x480, fx = fy = 525) and a loose model box around each object:

- coverage: a flat object covering 20-100 % of its box, in front of a wall, the box's slack split unevenly;
- hollow: a mug's rim seen from above, a ring round a hole of 10-30 % of the box through which the floor shows;
- thin: a bottle (a cylinder) or a chair leg (a bar) in a box two to five times its width;
- edge occluder: a nearer thing over 10-35 % of the box from its left or right edge; wide edge occluder: 40-50 %,
  where which surface is the object is a guess (the lift should say so);
- sloped table: a box on a table plane whose depth grows up the image, the box holding table and wall too.

Every scene has RealSense-like noise (sigma = 0.005 z^2) and 20 % holes, the object at 0.5-3 m. The wrist scenes
put the object at 0.07-0.5 m, as a D405 on a gripper sees it, with its close-range noise (sigma = 0.01 z^2:
bench/README.md, "Close-range noise"), 20 % holes and whole millimetres:

- wrist tilted face: a flat face 5-30 mm deeper at one side than the other, covering 30-100 % of its box;
- wrist curved: a can (a cylinder as wide as the object) covering 30-100 % of its box;
- wrist gripper finger: a face covering 60-100 % of its box, a finger 1-5 cm in front of it over 10-30 % of the
  box from its left or right edge.

For each lift it
reports the error of the visible-surface depth (against the median true depth of the object's visible pixels) and
of the visible-surface point, how often the returned depth lies between two surfaces (farther than max(3 cm,
2 sigma) from every surface in the box), how often it is off by more than that bound (another surface), and how
often that happens without the lift marking the object ambiguous; for the wrist scenes also the error of the x
extent. Two baselines run on the same scenes in the same run: "old", the median of the valid depths in the
central 50 % of the box (the rule before issue 21, copied here), and "0b3964b", the layered lift as it was at that
commit (issue 21's, before issue 24 made it read a wrist camera), loaded from the repository's history (left out,
with a note, where there is none). Last, the cost per object of each on a 1080p 16UC1 frame.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
import tracemalloc
import types
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from bench._common import BENCH_DIR, machine, per_call_us, percentile, quick_timing, table, timing_parser, write_results

from spatialthinker_ros.core.depth_layers import depth_noise  # noqa: E402
from spatialthinker_ros.core.geometry import CameraIntrinsics, DepthImage, LiftConfig, box_in_depth, lift_box  # noqa: E402
from spatialthinker_ros.core.types import Box, Position3D  # noqa: E402

WIDTH, HEIGHT = 640, 480
K = CameraIntrinsics(fx=525.0, fy=525.0, cx=319.5, cy=239.5, width=WIDTH, height=HEIGHT)
HOLES = 0.2
FAR_KINDS = ("coverage", "hollow", "thin", "edge occluder", "wide edge occluder", "sloped table")
WRIST_KINDS = ("wrist tilted face", "wrist curved", "wrist gripper finger")
KINDS = FAR_KINDS + WRIST_KINDS
RANGES = ((0.5, 1.0), (1.0, 2.0), (2.0, 3.0))
WRIST_RANGES = ((0.07, 0.15), (0.15, 0.3), (0.3, 0.5))
WRIST_NOISE_PER_M = 0.01   # a D405 at 848x480: 0.08 px subpixel / (447 px x 18 mm baseline); bench/README.md
BASELINE_COMMIT = "0b3964b"   # issue 21's layered lift, the rule issue 24 replaced


def lift_at_commit(commit: str) -> Optional[Callable]:
    """lift_box as it was at `commit`, compiled from the repository's history; None where there is none (a copy
    of the files outside a git clone), with the reason on stderr."""
    path = "spatialthinker_ros/core/geometry.py"
    try:
        source = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=BENCH_DIR, capture_output=True, text=True,
                                check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"[lift_accuracy] the {commit} lift is left out: git show {commit}:{path} failed ({exc})",
              file=sys.stderr)
        return None
    module = types.ModuleType(f"geometry_{commit}")
    sys.modules[module.__name__] = module   # dataclasses look their module up
    exec(compile(source, f"{commit}:{path}", "exec"), module.__dict__)
    return lambda box, depth, intrinsics, image_size: module.lift_box(box, depth, intrinsics, image_size)


def old_lift_box(box: Box, depth: DepthImage, intrinsics: CameraIntrinsics, image_size: tuple[int, int],
                 config: LiftConfig = LiftConfig()) -> Optional[Position3D]:
    """The lift before issue 21, kept here as the baseline: the median of the valid depths in the central `shrink`
    of the box is the surface; the centre lies half the whole box's 10th-90th percentile spread behind it."""
    shrink = config.shrink
    in_depth = box_in_depth(box, depth, intrinsics, image_size)
    if in_depth is None:
        return None
    mapped, k = in_depth
    depth_h, depth_w = depth.shape

    def region(b: Box) -> np.ndarray:
        rows = _span(b.y_min, b.y_max, depth_h)
        cols = _span(b.x_min, b.x_max, depth_w)
        step = max(1, math.ceil(math.sqrt((rows[1] - rows[0]) * (cols[1] - cols[0]) / 65536)))
        return depth.metres(slice(*rows, step), slice(*cols, step))

    def valid(d: np.ndarray) -> np.ndarray:
        return d[(d >= config.min_depth_m) & (d <= config.max_depth_m)]

    dx, dy = mapped.width * (1 - shrink) / 2, mapped.height * (1 - shrink) / 2
    inner_region = region(Box(mapped.x_min + dx, mapped.y_min + dy, mapped.x_max - dx, mapped.y_max - dy))
    inner = valid(inner_region)
    if inner.size == 0 or inner.size < config.min_valid_fraction * inner_region.size:
        return None
    surface = float(np.median(inner))
    whole = valid(region(mapped))
    p10, p90 = np.percentile(whole if whole.size else inner, (10, 90))
    size_x = mapped.width * surface / k.fx
    size_y = mapped.height * surface / k.fy
    size_z = min(float(p90 - p10), size_x, size_y)
    z = surface + size_z / 2
    u = (mapped.x_min + mapped.x_max) / 2 - 0.5
    v = (mapped.y_min + mapped.y_max) / 2 - 0.5
    return Position3D(x=(u - k.cx) * z / k.fx, y=(v - k.cy) * z / k.fy, z=z, size_x=size_x, size_y=size_y,
                      size_z=size_z)


def _span(lo: float, hi: float, limit: int) -> tuple[int, int]:
    start = min(max(math.ceil(lo - 0.5), 0), limit - 1)
    return start, min(max(math.floor(hi - 0.5) + 1, start + 1), limit)


@dataclass
class Scene:
    """A noise-free depth image with one label per pixel (0 background, 1 the object, 2.. other surfaces)."""

    depth: np.ndarray
    labels: np.ndarray
    box: Box
    kind: str
    object_z: float
    noise_per_m: float = 0.005     # the sensor's noise model (depth_noise)


def _loose_box(x0: int, y0: int, x1: int, y1: int, coverage: float, rng: np.random.Generator) -> Box:
    """A box around the object's pixels [x0, x1) x [y0, y1) holding it at about `coverage` of its area, the slack
    split unevenly between the sides."""
    grow = 1 / math.sqrt(coverage)
    extra_w, extra_h = (x1 - x0) * (grow - 1), (y1 - y0) * (grow - 1)
    left, top = rng.uniform(0.0, 1.0) * extra_w, rng.uniform(0.0, 1.0) * extra_h
    return Box(max(0.0, x0 - left), max(0.0, y0 - top), min(WIDTH, x1 + extra_w - left),
               min(HEIGHT, y1 + extra_h - top))


def render_wrist(kind: str, rng: np.random.Generator) -> Scene:
    """A wrist camera's scene: the object at 0.07-0.5 m, 60-250 px across, a table or shelf 2-15 cm behind it."""
    z = rng.uniform(0.07, 0.5)
    behind = z + rng.uniform(0.02, 0.15)
    depth = np.full((HEIGHT, WIDTH), behind, np.float32)
    labels = np.zeros((HEIGHT, WIDTH), np.int8)
    side = int(rng.uniform(60, 250))
    cx, cy = WIDTH // 2 + int(rng.integers(-80, 80)), HEIGHT // 2 + int(rng.integers(-60, 60))
    x0, y0 = max(0, cx - side // 2), max(0, cy - side // 2)
    x1, y1 = min(WIDTH, x0 + side), min(HEIGHT, y0 + side)
    across = (np.arange(x0, x1) + 0.5 - x0) / (x1 - x0)            # 0 at the left edge, 1 at the right
    if kind == "wrist curved":
        offset = 2 * across - 1
        radius = (x1 - x0) / 2 * z / K.fx
        face = z + radius * (1 - np.sqrt(np.clip(1 - offset ** 2, 0, 1)))
    else:
        tilt = rng.uniform(0.005, 0.03) * (1 if rng.random() < 0.5 else -1)
        face = z + tilt * (across if tilt > 0 else across - 1)     # the nearest edge at z either way
    depth[y0:y1, x0:x1], labels[y0:y1, x0:x1] = face[None, :], 1
    coverage = rng.uniform(0.6, 1.0) if kind == "wrist gripper finger" else rng.uniform(0.3, 1.0)
    box = _loose_box(x0, y0, x1, y1, coverage, rng)
    if kind == "wrist gripper finger":
        width = int(rng.uniform(0.1, 0.3) * box.width)
        finger = max(0.05, z - rng.uniform(0.01, 0.05))
        cols = slice(0, int(box.x_min) + width) if rng.random() < 0.5 else slice(int(math.ceil(box.x_max)) - width,
                                                                                  WIDTH)
        depth[:, cols], labels[:, cols] = finger, 2
    return Scene(depth=depth, labels=labels, box=box, kind=kind, object_z=z, noise_per_m=WRIST_NOISE_PER_M)


def render(kind: str, rng: np.random.Generator) -> Scene:
    if kind in WRIST_KINDS:
        return render_wrist(kind, rng)
    z = rng.uniform(0.5, 3.0)
    wall = z + rng.uniform(0.3, 1.5)
    depth = np.full((HEIGHT, WIDTH), wall, np.float32)
    labels = np.zeros((HEIGHT, WIDTH), np.int8)
    side = int(rng.uniform(0.08, 0.16) / z * K.fx)             # an 8-16 cm object, in pixels at its range
    cx, cy = WIDTH // 2 + int(rng.integers(-80, 80)), HEIGHT // 2 + int(rng.integers(-60, 60))
    x0, y0 = cx - side // 2, cy - side // 2
    x1, y1 = x0 + side, y0 + side
    if kind == "coverage":
        depth[y0:y1, x0:x1], labels[y0:y1, x0:x1] = z, 1
        box = _loose_box(x0, y0, x1, y1, rng.uniform(0.2, 1.0), rng)
    elif kind == "hollow":
        depth[:] = z + rng.uniform(0.08, 0.3)                      # the floor under the mug, or the mug's bottom
        depth[y0:y1, x0:x1], labels[y0:y1, x0:x1] = z, 1
        hole = int(side * math.sqrt(rng.uniform(0.1, 0.3)))
        h0x, h0y = x0 + (side - hole) // 2, y0 + (side - hole) // 2
        depth[h0y:h0y + hole, h0x:h0x + hole], labels[h0y:h0y + hole, h0x:h0x + hole] = depth[0, 0], 0
        box = Box(x0, y0, x1, y1)
    elif kind == "thin":
        radius = max(2, int(side * rng.uniform(0.08, 0.25)))
        tall = min(HEIGHT - 2, side * 2)
        top = max(0, cy - tall // 2)
        cols = np.arange(cx - radius, cx + radius)
        if rng.random() < 0.5:                                     # a bottle: a cylinder of that radius
            metric_r = radius * z / K.fx
            offset = (cols + 0.5 - cx) / radius
            depth[top:top + tall, cols] = z + metric_r * (1 - np.sqrt(np.clip(1 - offset ** 2, 0, 1)))
        else:                                                      # a chair leg: a flat bar
            depth[top:top + tall, cols] = z
        labels[top:top + tall, cols] = 1
        slack = rng.uniform(2.0, 5.0)
        half = radius * slack
        shift = rng.uniform(-0.3, 0.3) * (half - radius)
        box = Box(max(0.0, cx - half + shift), max(0.0, top - 0.05 * tall), min(WIDTH, cx + half + shift),
                  min(HEIGHT, top + 1.05 * tall))
    elif kind in ("edge occluder", "wide edge occluder"):
        depth[y0:y1, x0:x1], labels[y0:y1, x0:x1] = z, 1
        box = _loose_box(x0, y0, x1, y1, rng.uniform(0.6, 1.0), rng)
        share = rng.uniform(0.1, 0.35) if kind == "edge occluder" else rng.uniform(0.4, 0.5)
        width = int(share * box.width)
        near = z * rng.uniform(0.4, 0.8)
        if rng.random() < 0.5:
            cols = slice(0, int(box.x_min) + width)
        else:
            cols = slice(int(math.ceil(box.x_max)) - width, WIDTH)
        depth[:, cols], labels[:, cols] = near, 2
    else:   # sloped table: depth grows up the image; the object stands on it; the wall rises behind the table
        rows = np.arange(HEIGHT, dtype=np.float32)[:, None]
        base_row = y1
        slope = rng.uniform(0.002, 0.01) * z                       # metres per pixel row
        table = z + (base_row - rows) * slope
        horizon = int(base_row - (wall - z) / slope)
        plane = np.broadcast_to(table, depth.shape)
        on_table = rows[:, 0] >= horizon
        depth[on_table], labels[on_table] = plane[on_table], 2
        depth[y0:y1, x0:x1], labels[y0:y1, x0:x1] = z, 1
        box = _loose_box(x0, y0, x1, y1, rng.uniform(0.3, 1.0), rng)
    return Scene(depth=depth, labels=labels, box=box, kind=kind, object_z=z)


def sensed(scene: Scene, rng: np.random.Generator) -> DepthImage:
    """The scene as a 16UC1 RealSense-like frame: Gaussian noise of the scene's sensor, 20 % of the pixels lost,
    rounded to whole millimetres."""
    noise = depth_noise(scene.depth, scene.noise_per_m)
    noisy = scene.depth + rng.standard_normal(scene.depth.shape).astype(np.float32) * noise
    noisy[rng.random(scene.depth.shape) < HOLES] = 0
    return DepthImage.from_sensor(np.clip(np.rint(noisy * 1000), 0, 65535).astype(np.uint16), "16UC1")


def truth(scene: Scene) -> tuple[float, np.ndarray, list[tuple[float, float]], float, float]:
    """The object's visible-surface depth and point, the depth ranges of the surfaces in the box, the share of
    the box the object's visible pixels cover, and the visible object's x extent in metres."""
    b = scene.box
    rows = slice(math.ceil(b.y_min - 0.5), math.floor(b.y_max - 0.5) + 1)
    cols = slice(math.ceil(b.x_min - 0.5), math.floor(b.x_max - 0.5) + 1)
    depth, labels = scene.depth[rows, cols], scene.labels[rows, cols]
    mine = labels == 1
    surface = float(np.median(depth[mine]))
    seen = np.flatnonzero(mine.any(axis=0))
    left, right = int(seen[0]), int(seen[-1])    # the visible columns' outer pixel edges, at their own depths
    z_left, z_right = float(np.median(depth[:, left][mine[:, left]])), float(np.median(depth[:, right][mine[:, right]]))
    extent = ((right + cols.start + 0.5 - K.cx) * z_right - (left + cols.start - 0.5 - K.cx) * z_left) / K.fx
    v, u = np.nonzero(mine)
    u, v = float(u.mean() + cols.start), float(v.mean() + rows.start)
    point = np.array([(u - K.cx) * surface / K.fx, (v - K.cy) * surface / K.fy, surface])
    surfaces = [(float(depth[labels == label].min()), float(depth[labels == label].max()))
                for label in np.unique(labels)]
    return surface, point, surfaces, float(mine.mean()), extent


def tolerance(z: float, scene: Scene) -> float:
    """The done-when bound: 3 cm or twice the depth noise at that range, whichever is larger; for a wrist scene
    3 mm plus twice its close-range noise."""
    if scene.kind in WRIST_KINDS:
        return 0.003 + 2 * float(depth_noise(z, scene.noise_per_m))
    return max(0.03, 2 * float(depth_noise(z)))


def measure(lift: Callable, scene: Scene, frame: DepthImage) -> Optional[dict]:
    position = lift(scene.box, frame, K, (WIDTH, HEIGHT))
    if position is None:
        return None
    surface_true, point_true, surfaces, coverage, extent = truth(scene)
    surface = position.z - position.size_z / 2
    point = np.array([position.x, position.y, position.z]) * (surface / position.z)
    on_a_surface = any(lo - tolerance(surface, scene) <= surface <= hi + tolerance(surface, scene)
                       for lo, hi in surfaces)
    return {"kind": scene.kind, "z": scene.object_z, "coverage": coverage,
            "depth_error": abs(surface - surface_true), "point_error": float(np.linalg.norm(point - point_true)),
            "extent_error": abs(position.size_x - extent) / extent,
            "bound": tolerance(surface_true, scene), "between": not on_a_surface,
            "ambiguous": bool(getattr(position, "ambiguous", False)), "spread": getattr(position, "depth_spread", 0)}


def summary(rows: list[dict]) -> dict:
    if not rows:
        return {"n": 0}
    depth_cm = [100 * r["depth_error"] for r in rows]
    point_cm = [100 * r["point_error"] for r in rows]
    off_bound = [r["depth_error"] > r["bound"] for r in rows]
    return {"n": len(rows),
            "depth_error_cm_p50": percentile(depth_cm, 50), "depth_error_cm_p90": percentile(depth_cm, 90),
            "depth_error_mm_p50": 10 * percentile(depth_cm, 50), "depth_error_mm_p90": 10 * percentile(depth_cm, 90),
            "extent_error_p50": percentile([r["extent_error"] for r in rows], 50),
            "extent_error_p90": percentile([r["extent_error"] for r in rows], 90),
            "point_error_cm_p50": percentile(point_cm, 50), "point_error_cm_p90": percentile(point_cm, 90),
            "between_rate": sum(r["between"] for r in rows) / len(rows),
            "ambiguous_rate": sum(r["ambiguous"] for r in rows) / len(rows),
            "off_bound_rate": sum(off_bound) / len(rows),
            "off_bound_unmarked_rate": sum(o and not r["ambiguous"] for o, r in zip(off_bound, rows)) / len(rows),
            "within_bound_p50": percentile([r["depth_error"] / r["bound"] for r in rows], 50)}


def cost_per_object_us(lifts: dict[str, Callable], repeat: int, min_time: float) -> dict:
    """Each lift on a 1080p 16UC1 frame with noise and holes, for boxes of three sizes."""
    rng = np.random.default_rng(1)
    metres = np.full((1080, 1920), 2.5, np.float32)
    metres[300:800, 600:1300] = 1.2
    metres += rng.standard_normal(metres.shape).astype(np.float32) * depth_noise(metres)
    metres[rng.random(metres.shape) < HOLES] = 0
    frame = DepthImage.from_sensor((metres * 1000).astype(np.uint16), "16UC1")
    k = CameraIntrinsics(fx=1380.0, fy=1380.0, cx=959.5, cy=539.5, width=1920, height=1080)
    boxes = {"200x200 px": Box(850, 450, 1050, 650), "800x600 px": Box(550, 250, 1350, 850),
             "whole 1920x1080 frame": Box(0, 0, 1920, 1080)}
    result = {}
    for name, box in boxes.items():
        for label, lift in lifts.items():
            result[f"{label}, {name}"] = per_call_us(lambda: lift(box, frame, k, (1920, 1080)), repeat, min_time)
    return result


def hostile_cost(repeat: int, min_time: float) -> dict:
    """The lift's cost per box on 1080p frames of hostile readings (docs/reliability-and-security.md states the
    bound): per-call time (best of the repeats, and the slowest single call) and peak allocations (tracemalloc),
    at the default settings and at the widest ones (min_depth 1 mm, max_depth 1 km, noise model off)."""
    rng = np.random.default_rng(2)
    shape = (1080, 1920)
    frames = {
        "32FC1 uniform 0.05-20 m": DepthImage.from_metres(rng.uniform(0.05, 20, shape).astype(np.float32)),
        "32FC1 NaN, inf, <0, 0, subnormal, 1e-30, 1e-6, 3.4e38 and valid": DepthImage.from_metres(rng.choice(
            np.array([np.nan, np.inf, -1, 0, 1e-45, 1e-30, 1e-6, 0.05, 0.07, 1.0, 19.99, 3.4e38], np.float32), shape)),
        "16UC1 random, depth_scale 1e-6": DepthImage(rng.integers(0, 65536, shape).astype(np.uint16), 1e-6),
        "16UC1 random, depth_scale 10": DepthImage(rng.integers(0, 65536, shape).astype(np.uint16), 10.0),
    }
    k = CameraIntrinsics(fx=1380.0, fy=1380.0, cx=959.5, cy=539.5, width=1920, height=1080)
    settings = {"default": (LiftConfig(), 0.005),
                "widest": (LiftConfig(min_depth_m=0.001, max_depth_m=1000.0), 0.0)}
    result = {}
    for setting, (config, noise) in settings.items():
        for name, frame in frames.items():
            for box_name, box in (("200x200 px", Box(850, 450, 1050, 650)), ("whole frame", Box(0, 0, 1920, 1080))):
                call = (lambda b=box, f=frame: lift_box(b, f, k, (1920, 1080), config, noise))
                slowest = 0.0
                for _ in range(20):
                    started = time.perf_counter()
                    call()
                    slowest = max(slowest, time.perf_counter() - started)
                tracemalloc.start()
                call()
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                result[f"{setting}, {name}, {box_name}"] = {
                    "us": per_call_us(call, repeat, min_time), "slowest_of_20_us": slowest * 1e6,
                    "peak_mb": peak / 2**20}
    return result


def main(argv=None) -> int:
    parser = timing_parser(__doc__, "lift_accuracy")
    parser.add_argument("--scenes", type=int, default=300, help="scenes per kind (--quick: 12)")
    parser.add_argument("--seed", type=int, default=21)
    args = parser.parse_args(argv)
    if quick_timing(args):
        args.scenes = 12
    rng = np.random.default_rng(args.seed)
    lifts = {"old": old_lift_box, BASELINE_COMMIT: lift_at_commit(BASELINE_COMMIT), "new": lift_box}
    lifts = {label: lift for label, lift in lifts.items() if lift is not None}
    measured: dict[str, list[dict]] = {label: [] for label in lifts}
    lost = {label: 0 for label in lifts}
    for kind in KINDS:
        for _ in range(args.scenes):
            scene = render(kind, rng)
            frame = sensed(scene, rng)
            for label, lift in lifts.items():
                row = measure(lift, scene, frame)
                if row is None:
                    lost[label] += 1
                else:
                    measured[label].append(row)

    def select(label: str, kind: Optional[str] = None, lo: float = 0.0, hi: float = 99.0, min_coverage: float = 0.0
               ) -> list[dict]:
        return [r for r in measured[label] if (kind is None or r["kind"] == kind) and lo <= r["z"] < hi
                and r["coverage"] >= min_coverage]

    by_kind = {label: {kind: summary(select(label, kind)) for kind in KINDS} for label in measured}
    done_when = {label: {f"{lo}-{hi} m": summary(select(label, None, lo, hi, 0.25)) for lo, hi in RANGES}
                 for label in measured}
    done_when_by_kind = {f"{kind}, {lo}-{hi} m": summary(select("new", kind, lo, hi, 0.25))
                         for kind in FAR_KINDS for lo, hi in RANGES}
    wrist = {label: {f"{lo}-{hi} m": summary(select(label, None, lo, hi, 0.25)) for lo, hi in WRIST_RANGES}
             for label in measured}
    wrist_by_kind = {f"{kind}, {lo}-{hi} m": summary(select("new", kind, lo, hi, 0.25))
                     for kind in WRIST_KINDS for lo, hi in WRIST_RANGES}
    costs = cost_per_object_us(lifts, args.repeat, args.min_time)
    hostile = hostile_cost(args.repeat, args.min_time)

    print(f"\nlift accuracy, {args.scenes} scenes per kind, {HOLES:.0%} holes; noise 0.005 z^2 at 0.5-3 m, "
          f"{WRIST_NOISE_PER_M} z^2 at 0.07-0.5 m (wrist); {machine()}")
    rows = []
    for kind in KINDS:
        for label in lifts:
            s = by_kind[label][kind]
            rows.append([kind, label, s["n"], f"{s['depth_error_cm_p50']:.1f}", f"{s['depth_error_cm_p90']:.1f}",
                         f"{s['point_error_cm_p50']:.1f}", f"{s['point_error_cm_p90']:.1f}",
                         f"{s['between_rate']:.1%}", f"{s['off_bound_rate']:.1%}", f"{s['ambiguous_rate']:.1%}",
                         f"{s['off_bound_unmarked_rate']:.1%}"])
    print(table(rows, ["scene", "lift", "n", "depth err p50 cm", "p90", "point err p50 cm", "p90",
                       "between surfaces", "beyond bound", "marked ambiguous", "beyond bound, unmarked"]))
    print("\nobjects covering >= 25 % of their box (the done-when set): median depth error / max(3 cm, 2 sigma)")
    rows = [[rng_name, label, s["n"], f"{s['depth_error_cm_p50']:.1f}", f"{s['within_bound_p50']:.2f}",
             f"{s['between_rate']:.1%}"]
            for label in lifts for rng_name, s in done_when[label].items()]
    print(table(rows, ["range", "lift", "n", "depth err p50 cm", "p50 / bound", "between surfaces"]))
    print("\nwrist scenes, objects covering >= 25 % of their box: depth error (mm; bar 3 mm + 2 sigma at the range's"
          " far end) and x extent error (bar 20 %)")
    rows = [[rng_name, label, s["n"], f"{s['depth_error_mm_p50']:.1f}", f"{s['depth_error_mm_p90']:.1f}",
             f"{3 + 2000 * WRIST_NOISE_PER_M * float(rng_name.split('-')[1][:-2]) ** 2:.1f}",
             f"{s['extent_error_p50']:.0%}", f"{s['extent_error_p90']:.0%}", f"{s['between_rate']:.1%}",
             f"{s['ambiguous_rate']:.1%}"]
            for label in lifts for rng_name, s in wrist[label].items()]
    print(table(rows, ["range", "lift", "n", "depth err p50 mm", "p90", "bar mm", "extent err p50", "p90",
                       "between surfaces", "marked ambiguous"]))
    rows = [[name, f"{us:.0f}"] for name, us in costs.items()]
    print("\ncost per object, 1080p 16UC1 frame (best of the repeats)")
    print(table(rows, ["lift, box", "us"]))
    rows = [[name, f"{c['us']:.0f}", f"{c['slowest_of_20_us']:.0f}", f"{c['peak_mb']:.2f}"]
            for name, c in hostile.items()]
    print("\nbounded cost: the new lift per box on hostile 1080p frames")
    print(table(rows, ["setting, frame, box", "us (best)", "slowest of 20 us", "peak MB"]))
    path = write_results("lift_accuracy", {
        "args": vars(args), "lost": lost, "by_kind": by_kind, "done_when_set": done_when,
        "done_when_set_new_by_kind": done_when_by_kind, "wrist_done_when_set": wrist,
        "wrist_done_when_set_new_by_kind": wrist_by_kind, "cost_us_per_object": costs, "hostile_cost": hostile,
        "cost_ratio_new_to": {label: {name: costs[f"new, {name}"] / costs[f"{label}, {name}"]
                                      for name in ("200x200 px", "800x600 px", "whole 1920x1080 frame")}
                              for label in lifts if label != "new"}}, args.json)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
