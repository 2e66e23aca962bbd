"""What the MCP tools return, ROS-free: the output models (their JSON schemas are the tools' output schemas), the
act-or-ask decision, the scene in agent-readable fields, `locate`'s matching, the one-line summaries and the
annotated JPEG. server.py turns the node's messages into the core types these take (ros/conversions.py)."""

from __future__ import annotations

import re
from typing import Literal, Optional, Sequence

import cv2
import numpy as np
from pydantic import BaseModel, Field

from spatialthinker_ros.core.annotate import draw_scene
from spatialthinker_ros.core.prompt import answer_options, option_letter
from spatialthinker_ros.core.types import ParsedResponse, RelationCheck, SceneGraph, SceneObject

Decision = Literal["act", "ask_for_help", "uncalibrated", "free_form"]

# The question a scene-only request carries (the node needs one; a replay file answers it like any other).
SCENE_QUESTION = "Describe the scene: every object, its box, and the relations between them."
MAX_IMAGE_BYTES = 256 * 1024      # an annotated image is JPEG, re-encoded smaller until under this
_CHECK_NAMES = {check: check.name.lower() for check in RelationCheck}


class PixelBox(BaseModel):
    """Corners in pixels of the source camera image: origin top-left, x right, y down."""
    x_min: float
    y_min: float
    x_max: float
    y_max: float


class Position(BaseModel):
    """Centre of the object's depth surface, metres, in the object's frame_id (camera optical: z forward, x right,
    y down)."""
    x: float
    y: float
    z: float


class ObjectOut(BaseModel):
    id: str = Field(description="the model's id, e.g. cup.1; unique within one answer")
    label: str = Field(description="the id without its .N suffix, e.g. cup")
    box: PixelBox
    position: Optional[Position] = Field(description="metres in frame_id; null without valid depth in the box")
    frame_id: str = Field(description="the camera's optical frame the position is in")
    depth_spread: float = Field(description="metres, about one standard deviation of the surface's depths; 0 "
                                            "without a position")
    depth_ambiguous: bool = Field(description="another surface in the box could as well be the object: the "
                                              "position is a best guess")


class RelationOut(BaseModel):
    subject: str = Field(description="an object id")
    predicate: str = Field(description="the model's words, e.g. 'left of'")
    object: str = Field(description="an object id")
    check: Literal["not_checked", "consistent", "contradicted", "uncertain"] = Field(
        description="what the measured 3D positions say about the relation")
    note: str = Field(description="the measured quantities in metres, or why it was not checked")


class FrameInfo(BaseModel):
    stamp: float = Field(description="ROS time of the camera frame answered on, seconds")
    camera: str = Field(description="the camera's name; empty when the request carried its own image")
    image_width: int
    image_height: int


class SceneResult(FrameInfo):
    objects: list[ObjectOut]
    relations: list[RelationOut]
    model: str
    inference_time_s: float
    status: Literal["complete", "partial", "no_answer"]
    status_message: str = Field(description="what was missing or repaired, and relations the depth contradicts")


class OptionProbability(BaseModel):
    option: str
    probability: float


class AskSpatialResult(SceneResult):
    answer: str = Field(description="the model's answer text; empty when it gave none")
    choice: str = Field(description="the option letter the answer names, else empty")
    option_probabilities: dict[str, OptionProbability] = Field(
        description="by option letter; empty for a free-form question or a backend without probabilities")
    prediction_set: list[str] = Field(description="letters of the calibrated prediction set")
    coverage: float = Field(description="probability the calibrated set holds the right option (0: uncalibrated)")
    decision: Decision = Field(description="act: the set holds exactly one option; ask_for_help: none or several; "
                                           "uncalibrated: no calibration or no probabilities; free_form: no options")


class LocateMatch(ObjectOut):
    match: Literal["label", "word"] = Field(description="label: the description names the label; word: they "
                                                        "share a word")


class LocateResult(FrameInfo):
    query: str
    matches: list[LocateMatch] = Field(description="best first: label matches, then those with a position, nearest")
    reason: str = Field(description="why nothing matched; empty when something did")


class CameraStatus(BaseModel):
    name: str
    topic: str
    last_frame_age_s: Optional[float] = Field(description="ROS time since the stamp of the newest frame this server "
                                                          "saw on the topic; null when none arrived")
    frames_received: int = Field(description="colour frames the node received (its ~/stats)")


class CalibrationStatus(BaseModel):
    coverage: float
    threshold: float
    rows: int
    setup: dict[str, Optional[str | bool | int]]   # bool first: pydantic would make True the integer 1


class NodeStatusResult(BaseModel):
    node: str
    lifecycle_state: str
    backend: str
    model: Optional[str]
    cameras: list[CameraStatus]
    calibration: Optional[CalibrationStatus] = Field(description="null: the node has no calibration, every "
                                                                 "decision is uncalibrated")
    queue: dict[str, int] = Field(description="the node's scheduler: queued, running, completed, ... and the "
                                              "queue_size limit")


def decision(offered: Sequence[str], probabilities: Sequence[float], prediction_set: Sequence[str],
             coverage: float) -> Decision:
    """The act-or-ask contract (docs/agents.md): act only on a calibrated singleton."""
    if not offered:
        return "free_form"
    if coverage <= 0 or not probabilities:
        return "uncalibrated"
    return "act" if len(prediction_set) == 1 else "ask_for_help"


def object_out(obj: SceneObject, frame_id: str) -> ObjectOut:
    p = obj.position
    return ObjectOut(id=obj.id, label=obj.label,
                     box=PixelBox(x_min=obj.box.x_min, y_min=obj.box.y_min, x_max=obj.box.x_max, y_max=obj.box.y_max),
                     position=Position(x=p.x, y=p.y, z=p.z) if p is not None else None, frame_id=frame_id,
                     depth_spread=p.depth_spread if p is not None else 0.0,
                     depth_ambiguous=p.ambiguous if p is not None else False)


def scene_fields(scene: SceneGraph, frame_id: str) -> dict:
    return {"objects": [object_out(o, frame_id) for o in scene.objects],
            "relations": [RelationOut(subject=r.subject, predicate=r.predicate, object=r.object,
                                      check=_CHECK_NAMES[r.check], note=r.check_note) for r in scene.relations],
            "image_width": scene.image_size[0], "image_height": scene.image_size[1]}


def scene_result(parsed: ParsedResponse, frame: dict, model: str, inference_time_s: float) -> SceneResult:
    """`frame`: stamp, camera, frame_id of the answer."""
    return SceneResult(**_common(parsed, frame, model, inference_time_s))


def ask_result(parsed: ParsedResponse, frame: dict, model: str, inference_time_s: float, question: str,
               options: Sequence[str], prediction_set: Sequence[str], coverage: float) -> AskSpatialResult:
    offered = answer_options(question, options)
    probabilities = parsed.option_probabilities
    by_letter = {option_letter(i): OptionProbability(option=text, probability=p)
                 for i, (text, p) in enumerate(zip(offered, probabilities))}
    return AskSpatialResult(**_common(parsed, frame, model, inference_time_s), answer=parsed.answer,
                            choice=parsed.choice, option_probabilities=by_letter,
                            prediction_set=list(prediction_set), coverage=coverage,
                            decision=decision(offered, probabilities, prediction_set, coverage))


def _common(parsed: ParsedResponse, frame: dict, model: str, inference_time_s: float) -> dict:
    return {**scene_fields(parsed.scene, frame["frame_id"]), "stamp": frame["stamp"], "camera": frame["camera"],
            "model": model, "inference_time_s": inference_time_s, "status": parsed.status.name.lower(),
            "status_message": parsed.status_message}


_ARTICLES = {"a", "an", "the", "some", "any"}


def _words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9]+", text.lower().replace("_", " ")) if w not in _ARTICLES]


def locate_result(scene: SceneResult, query: str) -> LocateResult:
    """The scene's objects the description names, best first: a label match (the description holds the whole label,
    or ends in the label's last word: "the red mug" finds "mug" and "coffee mug") before a shared word ("coffee
    cup" finds "coffee mug"), then those with a position, nearest first."""
    wanted = _words(query)
    matches = []
    for obj in scene.objects:
        label = _words(obj.label)
        if not label or not wanted:
            continue
        n = len(label)
        if any(wanted[i:i + n] == label for i in range(len(wanted) - n + 1)) or label[-1:] == wanted[-1:]:
            kind = "label"
        elif set(label) & set(wanted):
            kind = "word"
        else:
            continue
        matches.append(LocateMatch(**obj.model_dump(), match=kind))
    matches.sort(key=lambda m: (m.match != "label", m.position is None, m.position.z if m.position else 0.0))
    reason = ""
    if not matches:
        seen = ", ".join(f"{o.id} ({o.label})" for o in scene.objects) or "none"
        reason = f"no object matches {query!r}; the scene's objects: {seen}"
    return LocateResult(stamp=scene.stamp, camera=scene.camera, image_width=scene.image_width,
                        image_height=scene.image_height, query=query, matches=matches, reason=reason)


def _where(obj: ObjectOut) -> str:
    p = obj.position
    return f"{obj.id} at z {p.z:.2f} m" if p is not None else f"{obj.id} (no depth)"


def scene_summary(result: SceneResult) -> str:
    objects = ", ".join(_where(o) for o in result.objects) or "no objects"
    where = result.camera or "the image"
    return f"{len(result.objects)} objects on {where}: {objects}; {len(result.relations)} relations"


def ask_summary(result: AskSpatialResult) -> str:
    chosen = f" ({result.choice})" if result.choice else ""
    head = f"answer: {result.answer or '(none)'}{chosen}; decision: {result.decision}"
    if result.decision in ("act", "ask_for_help"):
        head += f" (prediction set {result.prediction_set or '[]'} at coverage {result.coverage:g})"
    return f"{head}. {scene_summary(result)}"


def locate_summary(result: LocateResult) -> str:
    if not result.matches:
        return result.reason
    return f"{len(result.matches)} match {result.query!r}: " + ", ".join(_where(m) for m in result.matches)


def error_text(code_name: str, message: str) -> str:
    """A node error as a tool error's text: the code's name first, so an agent can branch on it."""
    return f"{code_name}: {message}"


def annotated_jpeg(rgb: np.ndarray, scene: SceneGraph, caption: str, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The frame with the scene drawn (the node's debug image), as JPEG of at most max_bytes: lower quality first,
    then halved sizes."""
    bgr = cv2.cvtColor(draw_scene(rgb, scene, caption), cv2.COLOR_RGB2BGR)
    while True:
        for quality in (85, 70, 50):
            ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
            if ok and len(data) <= max_bytes:
                return data.tobytes()
        if min(bgr.shape[:2]) <= 16:
            raise ValueError(f"cannot encode the image in {max_bytes} bytes")
        bgr = cv2.resize(bgr, (bgr.shape[1] // 2, bgr.shape[0] // 2), interpolation=cv2.INTER_AREA)
