#!/usr/bin/env python3
"""Render the bundled sample tabletop scene: colour image, registered depth, ground truth and a replay file.

The demo, the CLI tests and users without a GPU need an image whose objects, depth and model answer agree, so
everything is derived from one small 3D scene here (a numpy ray caster: a table, a mug with a handle, a plate
and a book in front of a wall) instead of being drawn by hand. Deterministic: rerunning rewrites the same files.

    .venv/bin/python scripts/make_sample_scene.py [--output spatialthinker_ros/data]

Writes (all small enough to ship with the package):
  sample_scene.png        640x480 RGB, 2x supersampled
  sample_scene_depth.png  640x480 uint16 depth in millimetres, registered to the colour image (same camera)
  sample_scene.json       camera intrinsics, each object's pixel box and 3D centre (optical frame), questions
  sample_replay.jsonl     a well-formed SpatialThinker answer per question, boxes in 640x480 pixels
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

WIDTH, HEIGHT = 640, 480
FX = FY = 525.0
CX, CY = (WIDTH - 1) / 2, (HEIGHT - 1) / 2       # ROS/OpenCV convention: pixel i's centre is at u = i
CAMERA_HEIGHT = 1.25                              # metres above the floor
PITCH = math.radians(40.0)                        # camera looks down by this much
SUPERSAMPLE = 2
LIGHT = np.array([-0.45, 1.0, -0.55]) / np.linalg.norm([-0.45, 1.0, -0.55])   # towards the light (world)
AMBIENT = 0.42

# World frame: x right, y up, z away from the camera along the floor. Metres.
TABLE_TOP = 0.75
TABLE = dict(x=(-0.80, 0.80), y=(TABLE_TOP - 0.04, TABLE_TOP), z=(0.22, 1.40))
WALL_Z = 1.70
MUG = dict(centre=(-0.19, 0.66), radius=0.042, height=0.10, wall=0.006)
HANDLE = dict(radius=0.028, tube=0.0075, y=TABLE_TOP + 0.052)
PLATE = dict(centre=(0.07, 0.55), radius=0.11, height=0.014)
BOOK = dict(x=(0.19, 0.41), y=(TABLE_TOP, TABLE_TOP + 0.035), z=(0.80, 1.08))

IDS = {"wall": 1, "floor": 2, "table": 3, "mug": 4, "plate": 5, "book": 6}


def rotation() -> np.ndarray:
    """Columns: the optical frame's x (right), y (image down) and z (forward) axes in world coordinates."""
    s, c = math.sin(PITCH), math.cos(PITCH)
    return np.array([[1.0, 0.0, 0.0], [0.0, -c, -s], [0.0, -s, c]]).T


CAMERA = np.array([0.0, CAMERA_HEIGHT, 0.0])
R = rotation()


def to_optical(point_world) -> list[float]:
    return [round(float(v), 4) for v in R.T @ (np.asarray(point_world, float) - CAMERA)]


@dataclass
class Hits:
    """Nearest hit per ray: t (= optical depth, since ray directions have optical z = 1), normal, object id."""

    t: np.ndarray
    normal: np.ndarray
    ident: np.ndarray
    part: np.ndarray      # sub-part code for texturing (e.g. the coffee inside the mug)

    def offer(self, t: np.ndarray, normal: np.ndarray, ident: int, part: np.ndarray | int = 0) -> None:
        closer = (t > 1e-6) & (t < self.t)
        self.t[closer] = t[closer]
        self.normal[closer] = normal[closer] if normal.ndim == 2 else normal
        self.ident[closer] = ident
        self.part[closer] = part[closer] if isinstance(part, np.ndarray) else part


def rays(scale: int) -> tuple[np.ndarray, tuple[int, int]]:
    """World ray directions for every (sub)pixel centre, optical z component 1."""
    width, height = WIDTH * scale, HEIGHT * scale
    u = (np.arange(width) + 0.5) / scale - 0.5
    v = (np.arange(height) + 0.5) / scale - 0.5
    uu, vv = np.meshgrid(u, v)
    optical = np.stack([(uu - CX) / FX, (vv - CY) / FY, np.ones_like(uu)], axis=-1).reshape(-1, 3)
    return optical @ R.T, (width, height)


def plane(d: np.ndarray, axis: int, value: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (value - CAMERA[axis]) / d[:, axis]
    return np.where(np.isfinite(t) & (t > 0), t, np.inf)


def box(hits: Hits, d: np.ndarray, lo, hi, ident: int, face_parts: Callable | None = None) -> None:
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (lo - CAMERA) / d, (hi - CAMERA) / d
    near, far = np.minimum(t1, t2), np.maximum(t1, t2)
    near = np.nan_to_num(near, nan=-np.inf)
    far = np.nan_to_num(far, nan=np.inf)
    t_enter, axis = near.max(axis=1), near.argmax(axis=1)
    hit = (t_enter <= far.min(axis=1)) & (t_enter > 0)
    t = np.where(hit, t_enter, np.inf)
    normal = np.zeros_like(d)
    normal[np.arange(len(d)), axis] = -np.sign(d[np.arange(len(d)), axis])
    part = face_parts(CAMERA + d * t[:, None], normal) if face_parts else 0
    hits.offer(t, normal, ident, part)


def cylinder(hits: Hits, d: np.ndarray, centre, radius: float, y0: float, y1: float, ident: int,
             cap_part: Callable | None = None) -> None:
    ox, oz = CAMERA[0] - centre[0], CAMERA[2] - centre[1]
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = 2 * (ox * d[:, 0] + oz * d[:, 2])
    c = ox**2 + oz**2 - radius**2
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore", divide="ignore"):
        t = (-b - np.sqrt(disc)) / (2 * a)
    y = CAMERA[1] + t * d[:, 1]
    t = np.where((disc >= 0) & (y >= y0) & (y <= y1), t, np.inf)
    p = CAMERA + d * np.where(np.isfinite(t), t, 0)[:, None]
    normal = np.stack([p[:, 0] - centre[0], np.zeros(len(d)), p[:, 2] - centre[1]], axis=1) / radius
    hits.offer(t, normal, ident)
    t_cap = plane(d, 1, y1)
    p = CAMERA + d * np.where(np.isfinite(t_cap), t_cap, 0)[:, None]
    radial = np.hypot(p[:, 0] - centre[0], p[:, 2] - centre[1])
    t_cap = np.where(radial <= radius, t_cap, np.inf)
    part = cap_part(radial) if cap_part else 1
    hits.offer(t_cap, np.array([0.0, 1.0, 0.0]), ident, part)


def sphere(hits: Hits, d: np.ndarray, centre, radius: float, ident: int) -> None:
    o = CAMERA - np.asarray(centre, float)
    a = (d * d).sum(axis=1)
    b = 2 * d @ o
    c = o @ o - radius**2
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore"):
        t = np.where(disc >= 0, (-b - np.sqrt(disc)) / (2 * a), np.inf)
    p = CAMERA + d * np.where(np.isfinite(t), t, 0)[:, None]
    hits.offer(t, (p - centre) / radius, ident)


def book_parts(p: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """1 cover, 2 pages (the sides that are not the spine), 3 title panel on the cover."""
    part = np.ones(len(p), np.int8)
    thickness = BOOK["y"][1] - BOOK["y"][0]
    side = (normal[:, 1] == 0) & (normal[:, 0] <= 0)          # -x and -z faces: page edges, spine on +x
    inner = (p[:, 1] > BOOK["y"][0] + 0.12 * thickness) & (p[:, 1] < BOOK["y"][1] - 0.12 * thickness)
    part[side & inner] = 2
    top = normal[:, 1] > 0
    title = (p[:, 0] > BOOK["x"][0] + 0.05) & (p[:, 0] < BOOK["x"][1] - 0.05) & \
            (p[:, 2] > BOOK["z"][0] + 0.08) & (p[:, 2] < BOOK["z"][1] - 0.08)
    part[top & title] = 3
    return part


def trace(scale: int) -> tuple[Hits, np.ndarray, tuple[int, int]]:
    d, size = rays(scale)
    n = len(d)
    hits = Hits(np.full(n, np.inf), np.zeros((n, 3)), np.zeros(n, np.int8), np.zeros(n, np.int8))
    hits.offer(plane(d, 2, WALL_Z), np.array([0.0, 0.0, -1.0]), IDS["wall"])
    hits.offer(plane(d, 1, 0.0), np.array([0.0, 1.0, 0.0]), IDS["floor"])
    box(hits, d, (TABLE["x"][0], TABLE["y"][0], TABLE["z"][0]), (TABLE["x"][1], TABLE["y"][1], TABLE["z"][1]),
        IDS["table"])
    for lx in (TABLE["x"][0] + 0.04, TABLE["x"][1] - 0.09):
        for lz in (TABLE["z"][0] + 0.04, TABLE["z"][1] - 0.09):
            box(hits, d, (lx, 0.0, lz), (lx + 0.05, TABLE["y"][0], lz + 0.05), IDS["table"])
    inner = MUG["radius"] - MUG["wall"]
    cylinder(hits, d, MUG["centre"], MUG["radius"], TABLE_TOP, TABLE_TOP + MUG["height"], IDS["mug"],
             cap_part=lambda radial: np.where(radial < inner, 2, 1).astype(np.int8))
    for angle in np.linspace(-math.pi / 2, math.pi / 2, 25):   # a half ring of small spheres on the mug's left
        hx = MUG["centre"][0] - MUG["radius"] + 0.004 - HANDLE["radius"] * math.cos(angle)
        sphere(hits, d, (hx, HANDLE["y"] + HANDLE["radius"] * math.sin(angle), MUG["centre"][1]), HANDLE["tube"],
               IDS["mug"])
    cylinder(hits, d, PLATE["centre"], PLATE["radius"], TABLE_TOP, TABLE_TOP + PLATE["height"], IDS["plate"],
             cap_part=lambda radial: np.where(np.abs(radial - 0.68 * PLATE["radius"]) < 0.004, 2, 1).astype(np.int8))
    box(hits, d, (BOOK["x"][0], BOOK["y"][0], BOOK["z"][0]), (BOOK["x"][1], BOOK["y"][1], BOOK["z"][1]),
        IDS["book"], face_parts=book_parts)
    return hits, d, size


def shadow(p: np.ndarray) -> np.ndarray:
    """Soft contact shadows of the objects on the table top (a darkening factor in [0.55, 1])."""
    dark = np.ones(len(p))
    along = -LIGHT[[0, 2]] / LIGHT[1]      # horizontal shift of a shadow per metre of height
    for (cx, cz), radius, height in ((MUG["centre"], MUG["radius"], MUG["height"]),
                                     (PLATE["centre"], PLATE["radius"], PLATE["height"]),
                                     (((BOOK["x"][0] + BOOK["x"][1]) / 2, (BOOK["z"][0] + BOOK["z"][1]) / 2), 0.14,
                                      0.035)):
        sx, sz = cx + along[0] * height * 0.6, cz + along[1] * height * 0.6
        distance = np.hypot(p[:, 0] - sx, p[:, 2] - sz) - radius
        dark = np.minimum(dark, 1 - 0.45 * np.clip(1 - distance / 0.03, 0, 1))
    return dark


def colours(hits: Hits, d: np.ndarray) -> np.ndarray:
    p = CAMERA + d * np.where(np.isfinite(hits.t), hits.t, 0)[:, None]
    base = np.zeros((len(d), 3))
    ident, part = hits.ident, hits.part
    base[ident == IDS["wall"]] = (0.97, 0.95, 0.90)
    wall = ident == IDS["wall"]
    base[wall] *= (0.92 + 0.08 * np.clip(p[wall, 1] / 1.5, 0, 1))[:, None]
    base[ident == IDS["floor"]] = (0.45, 0.43, 0.41)
    table = ident == IDS["table"]
    grain = 1 + 0.035 * np.sin(110 * p[table, 2] + 3 * np.sin(9 * p[table, 0])) + 0.02 * np.sin(37 * p[table, 2])
    base[table] = np.array([0.62, 0.42, 0.24]) * grain[:, None]
    base[(ident == IDS["mug"])] = (0.78, 0.13, 0.11)
    base[(ident == IDS["mug"]) & (part == 2)] = (0.22, 0.12, 0.06)                   # coffee
    base[ident == IDS["plate"]] = (0.94, 0.94, 0.91)
    base[(ident == IDS["plate"]) & (part == 2)] = (0.82, 0.82, 0.80)                 # rim of the well
    base[ident == IDS["book"]] = (0.13, 0.27, 0.58)
    base[(ident == IDS["book"]) & (part == 2)] = (0.93, 0.90, 0.80)                  # pages
    base[(ident == IDS["book"]) & (part == 3)] = (0.86, 0.72, 0.30)                  # title panel
    light = AMBIENT + (1 - AMBIENT) * np.clip(hits.normal @ LIGHT, 0, 1)
    light[wall] = 0.9                                   # the room's light, not the lamp's, falls on the wall
    top = (ident == IDS["table"]) & (hits.normal[:, 1] > 0.5)
    light[top] *= shadow(p[top])
    view = -d / np.linalg.norm(d, axis=1, keepdims=True)
    half = (view + LIGHT) / np.linalg.norm(view + LIGHT, axis=1, keepdims=True)
    shiny = np.isin(ident, (IDS["mug"], IDS["plate"]))
    specular = np.where(shiny, 0.35 * np.clip((hits.normal * half).sum(axis=1), 0, 1) ** 40, 0)
    return np.clip(base * light[:, None] + specular[:, None], 0, 1)


def object_boxes(ident: np.ndarray) -> dict[str, list[float]]:
    """Tight pixel-edge boxes [x1, y1, x2, y2] (640x480 pixels) of each object's visible pixels."""
    boxes = {}
    for name in ("mug", "plate", "book", "table"):
        ys, xs = np.nonzero(ident == IDS[name])
        boxes[name] = [xs.min() / SUPERSAMPLE, ys.min() / SUPERSAMPLE,
                       (xs.max() + 1) / SUPERSAMPLE, (ys.max() + 1) / SUPERSAMPLE]
    return boxes


def model_box(box: list[float], pad: float) -> list[int]:
    """What a good model answers: integers, a little loose."""
    return [max(0, math.floor(box[0] - pad)), max(0, math.floor(box[1] - pad)),
            min(WIDTH, math.ceil(box[2] + pad)), min(HEIGHT, math.ceil(box[3] + pad))]


QUESTIONS = (
    dict(question="Where is the mug relative to the plate?", options=["left of", "right of", "behind", "in front of"],
         answer="(A) left of", option_probabilities=[0.82, 0.05, 0.09, 0.04]),
    dict(question="Which object is closest to the camera?", options=["the mug", "the plate", "the book"],
         answer="(B) the plate", option_probabilities=[0.21, 0.66, 0.13]),
)


def scene_json(scene: dict) -> str:
    """The layout the model writes: one object or relationship per line."""
    objects = ",\n".join(f"    {json.dumps(o)}" for o in scene["objects"])
    relations = ",\n".join(f"    {json.dumps(r)}" for r in scene["relationships"])
    return f'{{\n  "objects": [\n{objects}\n  ],\n  "relationships": [\n{relations}\n  ]\n}}'


def responses(b: dict[str, list[int]]) -> list[str]:
    """SpatialThinker-format answers to QUESTIONS, in the authors' four-tag format, boxes from the render."""
    mug, plate, book = b["mug"], b["plate"], b["book"]
    objects = [{"id": "mug.1", "bbox": mug}, {"id": "plate.1", "bbox": plate}, {"id": "book.1", "bbox": book}]
    observe = ("The image shows a wooden table against a plain light wall. On the table there is a red mug with "
               "coffee in it on the left, an empty white plate in the middle, and a closed blue book lying flat "
               "further back on the right.")
    first = {
        "objects": objects,
        "relationships": [
            {"subject": "mug.1", "predicate": "left of", "object": "plate.1"},
            {"subject": "book.1", "predicate": "behind", "object": "plate.1"},
        ],
    }
    second = {
        "objects": objects,
        "relationships": [
            {"subject": "plate.1", "predicate": "in front of", "object": "mug.1"},
            {"subject": "plate.1", "predicate": "in front of", "object": "book.1"},
            {"subject": "mug.1", "predicate": "in front of", "object": "book.1"},
        ],
    }
    think_1 = (f"The mug's box spans x={mug[0]}-{mug[2]} and the plate's box spans x={plate[0]}-{plate[2]}: the "
               f"boxes do not overlap horizontally and the whole mug lies to the left of the plate. The mug stands a "
               f"little further back on the table than the plate, but the clear relation between them is the "
               f"horizontal one, so the mug is left of the plate.")
    think_2 = (f"All three objects stand on the same table top, which the camera looks down on, so the lower an "
               f"object's base appears in the image the closer it is. The plate's box reaches y={plate[3]}, the "
               f"mug's y={mug[3]} and the book's only y={book[3]}, near the back of the table. The plate is "
               f"therefore the closest object to the camera.")
    texts = []
    for scene, think, q in ((first, think_1, QUESTIONS[0]), (second, think_2, QUESTIONS[1])):
        texts.append(f"<observe>\n{observe}\n</observe>\n<scene>\n{scene_json(scene)}\n</scene>\n"
                     f"<think>\n{think}\n</think>\n<answer> {q['answer']} </answer>")
    return texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(__file__).resolve().parents[1] / "spatialthinker_ros" / "data"
    parser.add_argument("--output", type=Path, default=default, help="folder to write (default: %(default)s)")
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)

    hits, d, (width, height) = trace(SUPERSAMPLE)
    rgb = colours(hits, d).reshape(height, width, 3)
    rgb = cv2.resize((rgb * 255).astype(np.float32), (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)
    rgb = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    boxes = object_boxes(hits.ident.reshape(height, width))

    depth_hits, _, _ = trace(1)
    depth_mm = np.clip(np.round(depth_hits.t.reshape(HEIGHT, WIDTH) * 1000), 0, 65535).astype(np.uint16)

    cv2.imwrite(str(args.output / "sample_scene.png"), rgb[:, :, ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 9])
    cv2.imwrite(str(args.output / "sample_scene_depth.png"), depth_mm, [cv2.IMWRITE_PNG_COMPRESSION, 9])

    model_boxes = {name: model_box(b, 2.0) for name, b in boxes.items()}
    centres = {
        "mug": (MUG["centre"][0], TABLE_TOP + MUG["height"] / 2, MUG["centre"][1]),
        "plate": (PLATE["centre"][0], TABLE_TOP + PLATE["height"] / 2, PLATE["centre"][1]),
        "book": (sum(BOOK["x"]) / 2, sum(BOOK["y"]) / 2, sum(BOOK["z"]) / 2),
    }
    meta = {
        "description": "Synthetic tabletop rendered by scripts/make_sample_scene.py; depth registered to colour.",
        "image": "sample_scene.png",
        "depth": "sample_scene_depth.png",
        "depth_unit_m": 0.001,
        "camera": {"width": WIDTH, "height": HEIGHT, "fx": FX, "fy": FY, "cx": CX, "cy": CY,
                   "frame_id": "sample_camera_optical_frame"},
        "objects": {
            f"{name}.1": {
                "visible_box": [round(v, 2) for v in boxes[name]],
                "model_box": model_boxes[name],
                **({"centre_m": to_optical(centres[name])} if name in centres else {}),
            }
            for name in ("mug", "plate", "book", "table")
        },
        "questions": list(QUESTIONS),
        "replay_file": "sample_replay.jsonl",
    }
    (args.output / "sample_scene.json").write_text(json.dumps(meta, indent=2) + "\n")
    with (args.output / "sample_replay.jsonl").open("w") as replay:
        for q, text in zip(QUESTIONS, responses(model_boxes)):
            replay.write(json.dumps({"question": q["question"], "response": text,
                                     "option_probabilities": q["option_probabilities"]}) + "\n")
    for name in ("sample_scene.png", "sample_scene_depth.png", "sample_scene.json", "sample_replay.jsonl"):
        print(f"{args.output / name}: {(args.output / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()
