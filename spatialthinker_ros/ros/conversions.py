"""ROS messages <-> core types. Frames are converted only here, and only when a request uses them.

The pixel decoding itself is ROS-free (core/images.py, shared with recordings read without ROS) and re-exported
here, so the ROS layer has one place to import conversions from. This module is also the one place where the
core's error codes become AskSpatial's.
"""

from __future__ import annotations

import numpy as np
from builtin_interfaces.msg import Duration
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from spatialthinker_ros.core.images import (  # noqa: F401 - re-exported for the ROS layer
    COLOUR_LAYOUTS, DEPTH_LAYOUTS, check_compressed, check_image_layout, compressed_to_rgb, depth_image,
    image_to_rgb, intrinsics_from_camera_info)
from spatialthinker_ros.core.request import ErrorCode, RequestError
from spatialthinker_ros.core.types import (AnswerStatus, Box, InferenceResult, ParsedResponse, Position3D,
                                           RelationCheck, SceneGraph, SceneObject, SceneRelation, SpatialResult)
from spatialthinker_ros.msg import SceneGraph as SceneGraphMsg
from spatialthinker_ros.msg import SceneObject as SceneObjectMsg
from spatialthinker_ros.msg import SceneRelation as SceneRelationMsg
from spatialthinker_ros.msg import SpatialAnswer
from spatialthinker_ros.srv import AskSpatial

# The one mapping of the core's error codes to the service's (the action's result uses the same constants).
ERROR_CODES = {
    ErrorCode.INVALID_REQUEST: AskSpatial.Response.ERROR_INVALID_REQUEST,
    ErrorCode.NO_IMAGE: AskSpatial.Response.ERROR_NO_IMAGE,
    ErrorCode.STALE_IMAGE: AskSpatial.Response.ERROR_STALE_IMAGE,
    ErrorCode.UNKNOWN_CAMERA: AskSpatial.Response.ERROR_UNKNOWN_CAMERA,
    ErrorCode.BUSY: AskSpatial.Response.ERROR_BUSY,
    ErrorCode.BACKEND: AskSpatial.Response.ERROR_BACKEND,
    ErrorCode.TIMEOUT: AskSpatial.Response.ERROR_TIMEOUT,
    ErrorCode.NOT_ACTIVE: AskSpatial.Response.ERROR_NOT_ACTIVE,
    ErrorCode.CANCELLED: AskSpatial.Response.ERROR_CANCELLED,
}


def fill_response(response, outcome: SpatialAnswer | RequestError):
    """An AskSpatial service response or action result with the answer, or with the error's code and message."""
    if isinstance(outcome, RequestError):
        response.success, response.error_code, response.message = False, ERROR_CODES[outcome.code], str(outcome)
    else:
        response.success, response.error_code, response.message = True, AskSpatial.Response.ERROR_NONE, ""
        response.answer = outcome
    return response


def rgb_to_image_msg(rgb: np.ndarray, header: Header) -> Image:
    """`data = arr.tobytes()`: assigning an ndarray to Image.data is ~100x slower in rclpy."""
    msg = Image(header=header, height=rgb.shape[0], width=rgb.shape[1], encoding="rgb8", is_bigendian=0,
                step=rgb.shape[1] * 3)
    msg.data = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    return msg


def scene_graph_msg(scene: SceneGraph, header: Header) -> SceneGraphMsg:
    msg = SceneGraphMsg(header=header, image_width=int(scene.image_size[0]), image_height=int(scene.image_size[1]))
    objects = []
    for obj in scene.objects:
        out = SceneObjectMsg(id=obj.id, label=obj.label, x_min=float(obj.box.x_min), y_min=float(obj.box.y_min),
                             x_max=float(obj.box.x_max), y_max=float(obj.box.y_max))
        if obj.position is not None:
            out.has_position = True
            p = obj.position
            out.position.x, out.position.y, out.position.z = float(p.x), float(p.y), float(p.z)
            out.size.x, out.size.y, out.size.z = float(p.size_x), float(p.size_y), float(p.size_z)
            out.depth_spread, out.depth_ambiguous = float(p.depth_spread), bool(p.ambiguous)
        objects.append(out)
    msg.objects = objects
    msg.relations = [SceneRelationMsg(subject=r.subject, predicate=r.predicate, object=r.object,
                                      check=int(r.check), check_note=r.check_note)
                     for r in scene.relations]
    return msg


def duration_msg(seconds: float) -> Duration:
    seconds = max(0.0, seconds)
    whole = int(seconds)
    return Duration(sec=whole, nanosec=int(round((seconds - whole) * 1e9)) % 1_000_000_000)


def spatial_answer_msg(result: SpatialResult, header: Header, request_id: str, camera: str, question: str,
                       options: list[str]) -> SpatialAnswer:
    parsed = result.parsed
    return SpatialAnswer(
        header=header, request_id=request_id, camera=camera, question=question, options=list(options),
        answer=parsed.answer, choice=parsed.choice, observation=parsed.observation, reasoning=parsed.reasoning,
        scene_graph=scene_graph_msg(parsed.scene, header), status=int(parsed.status),
        status_message=parsed.status_message, raw_response=result.inference.text, model=result.inference.model,
        prompt_tokens=max(0, int(result.inference.prompt_tokens)),
        completion_tokens=max(0, int(result.inference.completion_tokens)),
        inference_time=duration_msg(result.inference.seconds))


def scene_graph_from_msg(msg: SceneGraphMsg) -> SceneGraph:
    """The core SceneGraph of a SceneGraph message (the inverse of scene_graph_msg)."""
    objects = []
    for o in msg.objects:
        position = None
        if o.has_position:
            position = Position3D(o.position.x, o.position.y, o.position.z, o.size.x, o.size.y, o.size.z,
                                  depth_spread=o.depth_spread, ambiguous=o.depth_ambiguous)
        objects.append(SceneObject(id=o.id, label=o.label, box=Box(o.x_min, o.y_min, o.x_max, o.y_max),
                                   position=position))
    relations = tuple(SceneRelation(r.subject, r.predicate, r.object, RelationCheck(r.check), r.check_note)
                      for r in msg.relations)
    return SceneGraph(objects=tuple(objects), relations=relations, image_size=(msg.image_width, msg.image_height))


def answer_from_msg(msg: SpatialAnswer) -> tuple[ParsedResponse, InferenceResult]:
    """The core form of a SpatialAnswer (the inverse of spatial_answer_msg), e.g. for core.pipeline.answer_dict.
    The message does not say whether the scene section was closed: taken as closed when it holds objects."""
    scene = scene_graph_from_msg(msg.scene_graph)
    parsed = ParsedResponse(observation=msg.observation, scene=scene, scene_complete=bool(scene.objects),
                            reasoning=msg.reasoning, answer=msg.answer, choice=msg.choice,
                            status=AnswerStatus(msg.status),
                            problems=tuple(p for p in msg.status_message.split("; ") if p))
    inference = InferenceResult(text=msg.raw_response, prompt_tokens=msg.prompt_tokens,
                                completion_tokens=msg.completion_tokens, model=msg.model,
                                seconds=msg.inference_time.sec + msg.inference_time.nanosec * 1e-9)
    return parsed, inference
