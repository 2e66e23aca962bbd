"""Draw a scene graph on its image: boxes, ids and relation arrows. Shared by the CLI and ~/debug_image.

Relation arrows and labels take the colour of their check against the depth (core/relations.py): red
contradicted, green consistent, amber uncertain, white not checked; a label says why when it is not agreement."""

from __future__ import annotations

import colorsys

import cv2
import numpy as np

from spatialthinker_ros.core.relations import VERDICT_COLOURS, verdict_label
from spatialthinker_ros.core.types import SceneGraph


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
        cv2.rectangle(canvas, p1, p2, colour, thickness)
        label = obj.id if obj.position is None else f"{obj.id} {obj.position.z:.2f}m"
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
