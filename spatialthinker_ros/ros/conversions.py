"""ROS messages <-> core types, and the one place where the core's error codes become AskSpatial's.

Frame decoding is core/images.py's (ROS-free, shared with recordings read without ROS; core/sources.py calls it
when a request uses a frame), re-exported here so the ROS layer has one place to import conversions from.
"""

from __future__ import annotations

from typing import Optional

import cv2
import numpy as np
from builtin_interfaces.msg import Duration
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header

from spatialthinker_ros.core.images import (  # noqa: F401 - re-exported for the ROS layer
    COLOUR_LAYOUTS, DEPTH_LAYOUTS, check_compressed, check_image_layout, compressed_to_rgb, depth_image,
    image_to_rgb, intrinsics_from_camera_info)
from spatialthinker_ros.core.geometry import CameraIntrinsics, DepthImage
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


def error_code_name(code: int) -> str:
    """AskSpatial's name for an error code (ERROR_BACKEND, ...): what a person can look up, unlike the number."""
    for name in dir(AskSpatial.Response):
        if name.startswith("ERROR_") and getattr(AskSpatial.Response, name) == code:
            return name
    return f"unknown error code {code}"


def fill_response(response, outcome: SpatialAnswer | RequestError, frame: Optional[np.ndarray] = None):
    """An AskSpatial service response or action result with the answer (and `frame`, the RGB image it is about,
    when the request's return_image asked for it), or with the error's code and message."""
    if isinstance(outcome, RequestError):
        response.success, response.error_code, response.message = False, ERROR_CODES[outcome.code], str(outcome)
    else:
        response.success, response.error_code, response.message = True, AskSpatial.Response.ERROR_NONE, ""
        response.answer = outcome
        if frame is not None:
            response.image = rgb_to_image_msg(frame, outcome.header)
    return response


def rgb_to_image_msg(rgb: np.ndarray, header: Header) -> Image:
    """`data = arr.tobytes()`: rosidl checks an ndarray assigned to Image.data element by element in Python."""
    msg = Image(header=header, height=rgb.shape[0], width=rgb.shape[1], encoding="rgb8", is_bigendian=0,
                step=rgb.shape[1] * 3)
    msg.data = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    return msg


def rgb_to_compressed_msg(rgb: np.ndarray, header: Header, image_format: str = "jpeg",
                          jpeg_quality: int = 95) -> CompressedImage:
    """RGB uint8 HxWx3 as a JPEG or PNG CompressedImage (what image_transport's compressed plugin sends)."""
    if image_format not in ("jpeg", "png"):
        raise ValueError(f"compressed format must be jpeg or png, not {image_format!r}")
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if image_format == "jpeg" else []
    ok, encoded = cv2.imencode(f".{'jpg' if image_format == 'jpeg' else 'png'}",
                               cv2.cvtColor(np.ascontiguousarray(rgb, dtype=np.uint8), cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"cannot encode the image as {image_format}")
    return CompressedImage(header=header, format=image_format, data=encoded.tobytes())


def depth_to_image_msg(depth: DepthImage, header: Header) -> Image:
    """A depth image as a camera driver sends it (REP 118): 16UC1 millimetres when that is what it holds, else
    32FC1 metres. Little-endian, like every sensor this runs on."""
    if depth.raw.dtype == np.uint16 and depth.scale == 0.001:
        data, encoding = depth.raw.astype("<u2"), "16UC1"
    else:
        data, encoding = depth.metres().astype("<f4"), "32FC1"
    height, width = data.shape
    msg = Image(header=header, height=height, width=width, encoding=encoding, is_bigendian=0,
                step=width * data.itemsize)
    msg.data = np.ascontiguousarray(data).tobytes()
    return msg


def camera_info_msg(intrinsics: CameraIntrinsics, header: Header) -> CameraInfo:
    """Pinhole CameraInfo without distortion (the inverse of intrinsics_from_camera_info)."""
    i = intrinsics
    k = [i.fx, 0.0, i.cx, 0.0, i.fy, i.cy, 0.0, 0.0, 1.0]
    return CameraInfo(header=header, width=i.width, height=i.height, distortion_model="plumb_bob", d=[0.0] * 5,
                      k=k, r=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
                      p=[i.fx, 0.0, i.cx, 0.0, 0.0, i.fy, i.cy, 0.0, 0.0, 0.0, 1.0, 0.0])


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
        answer=parsed.answer, choice=parsed.choice, option_probabilities=list(parsed.option_probabilities),
        prediction_set=list(result.prediction_set), prediction_set_coverage=float(result.prediction_set_coverage),
        observation=parsed.observation, reasoning=parsed.reasoning,
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
                            problems=tuple(p for p in msg.status_message.split("; ") if p),
                            option_probabilities=tuple(float(p) for p in msg.option_probabilities))
    inference = InferenceResult(text=msg.raw_response, prompt_tokens=msg.prompt_tokens,
                                completion_tokens=msg.completion_tokens, model=msg.model,
                                seconds=msg.inference_time.sec + msg.inference_time.nanosec * 1e-9)
    return parsed, inference
