"""Draw a scene graph on its image: boxes, ids and relation arrows. Shared by the CLI and ~/debug_image.

Relation arrows and labels take the colour of their check against the depth (core/relations.py): red
contradicted, green consistent, amber uncertain, white not checked; a label says why when it is not agreement.
An object whose depth is ambiguous (Position3D.ambiguous: which surface in its box is the object was a guess) has
a dashed box and its depth marked with AMBIGUOUS_MARK; the RViz markers mark it too (ros/visualization.py)."""

from __future__ import annotations

import colorsys

import cv2
import numpy as np

from spatialthinker_ros.core.relations import VERDICT_COLOURS, verdict_label
from spatialthinker_ros.core.types import SceneGraph, SceneObject


AMBIGUOUS_MARK = "?"   # after the depth of an object whose position is a guess between surfaces (docs/node.md)
_DASH = 8             # pixels per dash (and per gap) of an ambiguous object's box, at 400 px of image


def object_label(obj: SceneObject) -> str:
    """The object's id, its depth when it has a position, and AMBIGUOUS_MARK when that depth is a guess."""
    if obj.position is None:
        return obj.id
    return f"{obj.id} {obj.position.z:.2f}m" + (AMBIGUOUS_MARK if obj.position.ambiguous else "")


def object_colour(index: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def _fit(text: str, origin: tuple[int, int], scale: float, thickness: int, canvas: np.ndarray) -> tuple[int, int]:
    """The bottom-left origin nearest `origin` at which `text` lies inside the canvas (left-aligned when it is
    wider than the canvas): a label at a box or arrow near an edge is moved in, never cut off."""
    (width, height), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    x = max(0, min(origin[0], canvas.shape[1] - width - 1))
    y = max(height, min(origin[1], canvas.shape[0] - base - 1))
    return x, y


def draw_scene(rgb: np.ndarray, scene: SceneGraph, caption: str = "") -> np.ndarray:
    """A copy of `rgb` (HxWx3, the image the scene's boxes refer to) with the scene drawn on it; every label
    stays inside the image."""
    canvas = np.ascontiguousarray(rgb, dtype=np.uint8).copy()
    thickness = max(1, round(max(canvas.shape[:2]) / 400))
    scale = max(0.4, max(canvas.shape[:2]) / 1200)
    centres = {}
    for i, obj in enumerate(scene.objects):
        colour = object_colour(i)
        p1 = (int(round(obj.box.x_min)), int(round(obj.box.y_min)))
        p2 = (int(round(obj.box.x_max)), int(round(obj.box.y_max)))
        if obj.position is not None and obj.position.ambiguous:
            _dashed_rectangle(canvas, p1, p2, colour, thickness)
        else:
            cv2.rectangle(canvas, p1, p2, colour, thickness)
        label = object_label(obj)
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        left, baseline = _fit(label, (p1[0] + 2, p1[1] - base - 1), scale, thickness, canvas)
        cv2.rectangle(canvas, (left - 2, baseline - th - 1), (left + tw + 2, baseline + base + 1), colour, -1)
        cv2.putText(canvas, label, (left, baseline), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness)
        centres[obj.id] = ((p1[0] + p2[0]) // 2, (p1[1] + p2[1]) // 2)
    for relation in scene.relations:
        if relation.subject in centres and relation.object in centres:
            start, end = centres[relation.subject], centres[relation.object]
            colour = VERDICT_COLOURS[relation.check]
            cv2.arrowedLine(canvas, start, end, colour, thickness, tipLength=0.05)
            label = verdict_label(relation)
            # the outline's extra width keeps it inside too
            at = _fit(label, ((start[0] + end[0]) // 2, (start[1] + end[1]) // 2), scale * 0.9, thickness + 2, canvas)
            # a dark outline keeps the coloured text readable on any background
            cv2.putText(canvas, label, at, cv2.FONT_HERSHEY_SIMPLEX, scale * 0.9, (0, 0, 0), thickness + 2)
            cv2.putText(canvas, label, at, cv2.FONT_HERSHEY_SIMPLEX, scale * 0.9, colour, thickness)
    if caption:
        text = caption[:120]
        at = _fit(text, (8, canvas.shape[0] - 10), scale, thickness, canvas)
        cv2.putText(canvas, text, at, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 0), thickness)
    return canvas


def _dashed_rectangle(canvas: np.ndarray, p1: tuple[int, int], p2: tuple[int, int], colour: tuple[int, int, int],
                      thickness: int) -> None:
    """The rectangle p1-p2 drawn in dashes: the outline of a box whose depth is ambiguous."""
    dash = _DASH * thickness
    for (x1, y1), (x2, y2) in (((p1[0], p1[1]), (p2[0], p1[1])), ((p2[0], p1[1]), (p2[0], p2[1])),
                               ((p2[0], p2[1]), (p1[0], p2[1])), ((p1[0], p2[1]), (p1[0], p1[1]))):
        length = max(abs(x2 - x1), abs(y2 - y1))
        for start in range(0, length, 2 * dash):
            stop = min(start + dash, length)
            a = (x1 + (x2 - x1) * start // max(length, 1), y1 + (y2 - y1) * start // max(length, 1))
            b = (x1 + (x2 - x1) * stop // max(length, 1), y1 + (y2 - y1) * stop // max(length, 1))
            cv2.line(canvas, a, b, colour, thickness)
