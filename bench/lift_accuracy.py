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

Every scene has RealSense-like noise (sigma = 0.005 z^2) and 20 % holes, the object at 0.5-3 m. For each lift it
reports the error of the visible-surface depth (against the median true depth of the object's visible pixels) and
of the visible-surface point, how often the returned depth lies between two surfaces (farther than max(3 cm,
2 sigma) from every surface in the box), how often it is off by more than that bound (another surface), and how
often that happens without the lift marking the object ambiguous. The old rule (the median of the valid depths in
the central 50 % of the box, before issue 21) is copied here as the baseline and runs on the same scenes in the same run. Last, the
cost per object of both on a 1080p 16UC1 frame.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from bench._common import machine, per_call_us, percentile, quick_timing, table, timing_parser, write_results

from spatialthinker_ros.core.geometry import (CameraIntrinsics, DepthImage, box_in_depth, depth_noise,  # noqa: E402
                                              lift_box)
from spatialthinker_ros.core.types import Box, Position3D  # noqa: E402

WIDTH, HEIGHT = 640, 480
K = CameraIntrinsics(fx=525.0, fy=525.0, cx=319.5, cy=239.5, width=WIDTH, height=HEIGHT)
HOLES = 0.2
KINDS = ("coverage", "hollow", "thin", "edge occluder", "wide edge occluder", "sloped table")
RANGES = ((0.5, 1.0), (1.0, 2.0), (2.0, 3.0))


def old_lift_box(box: Box, depth: DepthImage, intrinsics: CameraIntrinsics, image_size: tuple[int, int],
                 min_valid_fraction: float = 0.05, max_depth: float = 20.0, shrink: float = 0.5
                 ) -> Optional[Position3D]:
    """The lift before issue 21, kept here as the baseline: the median of the valid depths in the central `shrink`
    of the box is the surface; the centre lies half the whole box's 10th-90th percentile spread behind it."""
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
        return d[(d > 0) & (d <= max_depth)]

    dx, dy = mapped.width * (1 - shrink) / 2, mapped.height * (1 - shrink) / 2
    inner_region = region(Box(mapped.x_min + dx, mapped.y_min + dy, mapped.x_max - dx, mapped.y_max - dy))
    inner = valid(inner_region)
    if inner.size == 0 or inner.size < min_valid_fraction * inner_region.size:
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


def _loose_box(x0: int, y0: int, x1: int, y1: int, coverage: float, rng: np.random.Generator) -> Box:
    """A box around the object's pixels [x0, x1) x [y0, y1) holding it at about `coverage` of its area, the slack
    split unevenly between the sides."""
    grow = 1 / math.sqrt(coverage)
    extra_w, extra_h = (x1 - x0) * (grow - 1), (y1 - y0) * (grow - 1)
    left, top = rng.uniform(0.0, 1.0) * extra_w, rng.uniform(0.0, 1.0) * extra_h
    return Box(max(0.0, x0 - left), max(0.0, y0 - top), min(WIDTH, x1 + extra_w - left),
               min(HEIGHT, y1 + extra_h - top))


def render(kind: str, rng: np.random.Generator) -> Scene:
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
    """The scene as a 16UC1 RealSense-like frame: Gaussian noise of depth_noise(z), 20 % of the pixels lost."""
    noisy = scene.depth + rng.standard_normal(scene.depth.shape).astype(np.float32) * depth_noise(scene.depth)
    noisy[rng.random(scene.depth.shape) < HOLES] = 0
    return DepthImage.from_sensor(np.clip(noisy * 1000, 0, 65535).astype(np.uint16), "16UC1")


def truth(scene: Scene) -> tuple[float, np.ndarray, list[tuple[float, float]], float]:
    """The object's visible-surface depth and point, the depth ranges of the surfaces in the box, and the share of
    the box the object's visible pixels cover."""
    b = scene.box
    rows = slice(math.ceil(b.y_min - 0.5), math.floor(b.y_max - 0.5) + 1)
    cols = slice(math.ceil(b.x_min - 0.5), math.floor(b.x_max - 0.5) + 1)
    depth, labels = scene.depth[rows, cols], scene.labels[rows, cols]
    mine = labels == 1
    surface = float(np.median(depth[mine]))
    v, u = np.nonzero(mine)
    u, v = float(u.mean() + cols.start), float(v.mean() + rows.start)
    point = np.array([(u - K.cx) * surface / K.fx, (v - K.cy) * surface / K.fy, surface])
    surfaces = [(float(depth[labels == label].min()), float(depth[labels == label].max()))
                for label in np.unique(labels)]
    return surface, point, surfaces, float(mine.mean())


def tolerance(z: float) -> float:
    """The done-when bound: 3 cm or twice the depth noise at that range, whichever is larger."""
    return max(0.03, 2 * float(depth_noise(z)))


def measure(lift: Callable, scene: Scene, frame: DepthImage) -> Optional[dict]:
    position = lift(scene.box, frame, K, (WIDTH, HEIGHT))
    if position is None:
        return None
    surface_true, point_true, surfaces, coverage = truth(scene)
    surface = position.z - position.size_z / 2
    point = np.array([position.x, position.y, position.z]) * (surface / position.z)
    on_a_surface = any(lo - tolerance(surface) <= surface <= hi + tolerance(surface) for lo, hi in surfaces)
    return {"kind": scene.kind, "z": scene.object_z, "coverage": coverage,
            "depth_error": abs(surface - surface_true), "point_error": float(np.linalg.norm(point - point_true)),
            "bound": tolerance(surface_true), "between": not on_a_surface,
            "ambiguous": bool(getattr(position, "ambiguous", False)), "spread": getattr(position, "depth_spread", 0)}


def summary(rows: list[dict]) -> dict:
    if not rows:
        return {"n": 0}
    depth_cm = [100 * r["depth_error"] for r in rows]
    point_cm = [100 * r["point_error"] for r in rows]
    off_bound = [r["depth_error"] > r["bound"] for r in rows]
    return {"n": len(rows),
            "depth_error_cm_p50": percentile(depth_cm, 50), "depth_error_cm_p90": percentile(depth_cm, 90),
            "point_error_cm_p50": percentile(point_cm, 50), "point_error_cm_p90": percentile(point_cm, 90),
            "between_rate": sum(r["between"] for r in rows) / len(rows),
            "ambiguous_rate": sum(r["ambiguous"] for r in rows) / len(rows),
            "off_bound_rate": sum(off_bound) / len(rows),
            "off_bound_unmarked_rate": sum(o and not r["ambiguous"] for o, r in zip(off_bound, rows)) / len(rows),
            "within_bound_p50": percentile([r["depth_error"] / r["bound"] for r in rows], 50)}


def cost_per_object_us(repeat: int, min_time: float) -> dict:
    """Both lifts on a 1080p 16UC1 frame with noise and holes, for boxes of three sizes."""
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
        for label, lift in (("old", old_lift_box), ("new", lift_box)):
            result[f"{label}, {name}"] = per_call_us(lambda: lift(box, frame, k, (1920, 1080)), repeat, min_time)
    return result


def main(argv=None) -> int:
    parser = timing_parser(__doc__, "lift_accuracy")
    parser.add_argument("--scenes", type=int, default=300, help="scenes per kind (--quick: 12)")
    parser.add_argument("--seed", type=int, default=21)
    args = parser.parse_args(argv)
    if quick_timing(args):
        args.scenes = 12
    rng = np.random.default_rng(args.seed)
    measured: dict[str, list[dict]] = {"old": [], "new": []}
    lost = {"old": 0, "new": 0}
    for kind in KINDS:
        for _ in range(args.scenes):
            scene = render(kind, rng)
            frame = sensed(scene, rng)
            for label, lift in (("old", old_lift_box), ("new", lift_box)):
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
                         for kind in KINDS for lo, hi in RANGES}
    costs = cost_per_object_us(args.repeat, args.min_time)

    print(f"\nlift accuracy, {args.scenes} scenes per kind, noise 0.005 z^2, {HOLES:.0%} holes, 0.5-3 m; {machine()}")
    rows = []
    for kind in KINDS:
        for label in ("old", "new"):
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
            for label in ("old", "new") for rng_name, s in done_when[label].items()]
    print(table(rows, ["range", "lift", "n", "depth err p50 cm", "p50 / bound", "between surfaces"]))
    rows = [[name, f"{us:.0f}"] for name, us in costs.items()]
    print("\ncost per object, 1080p 16UC1 frame (best of the repeats)")
    print(table(rows, ["lift, box", "us"]))
    path = write_results("lift_accuracy", {
        "args": vars(args), "lost": lost, "by_kind": by_kind, "done_when_set": done_when,
        "done_when_set_new_by_kind": done_when_by_kind, "cost_us_per_object": costs,
        "cost_ratio_new_to_old": {name: costs[f"new, {name}"] / costs[f"old, {name}"]
                                  for name in ("200x200 px", "800x600 px", "whole 1920x1080 frame")}}, args.json)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
