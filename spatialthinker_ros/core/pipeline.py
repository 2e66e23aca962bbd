"""The ROS-free flow shared by the CLI and the ROS node: frame + question -> request, raw text -> result.

Between the two calls a backend turns the request into text; keeping both ends here means the CLI, the node
and the tests agree on image sizes, prompt and status by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import cv2
import numpy as np

from spatialthinker_ros.core.geometry import CameraIntrinsics, DepthImage, lift_box, map_scene
from spatialthinker_ros.core.parsing import decide_status, parse_response
from spatialthinker_ros.core.prompt import PromptConfig, build_prompt
from spatialthinker_ros.core.relations import RelationCheckConfig, check_scene, contradictions
from spatialthinker_ros.core.types import (
    AnswerStatus,
    InferenceRequest,
    InferenceResult,
    InvalidRequest,
    SceneGraph,
    SpatialResult,
)


@dataclass(frozen=True)
class PipelineConfig:
    """Prompt, input-size cap, depth-lifting settings (see geometry.lift_box for the depth ones) and the checks of
    the model's relations against the 3D positions (core/relations.py)."""

    prompt: PromptConfig = PromptConfig()
    # Larger frames are downscaled before the prompt states their size: the model's cost grows with pixels,
    # and Qwen2.5-VL would otherwise see up to 12.8 MP.
    max_input_pixels: int = 1920 * 1080
    min_valid_depth_fraction: float = 0.05
    max_depth_m: float = 20.0
    depth_box_shrink: float = 0.5
    relations: RelationCheckConfig = RelationCheckConfig()

    def __post_init__(self) -> None:
        if self.max_input_pixels < 1:
            raise ValueError(f"max_input_pixels must be positive, not {self.max_input_pixels}")
        if not 0 < self.min_valid_depth_fraction <= 1:
            raise ValueError(f"min_valid_depth_fraction must be in (0, 1], not {self.min_valid_depth_fraction}")
        if not (math.isfinite(self.max_depth_m) and self.max_depth_m > 0):
            raise ValueError(f"max_depth_m must be positive and finite, not {self.max_depth_m}")
        if not 0 < self.depth_box_shrink <= 1:
            raise ValueError(f"depth_box_shrink must be in (0, 1], not {self.depth_box_shrink}")


def prepare_request(
    image_rgb: np.ndarray,
    question: str,
    options: Sequence[str],
    config: PipelineConfig = PipelineConfig(),
    scene_only: bool = False,
    on_text: Optional[Callable[[str, int], None]] = None,
    request_id: str = "",
) -> InferenceRequest:
    """A validated request whose prompt states the size of the image the model will see.

    The image is passed on as is (not copied) when it needs no downscaling: do not write to it afterwards.
    """
    _check_image(image_rgb)
    height, width = image_rgb.shape[:2]
    model_width, model_height = model_image_size((width, height), config.max_input_pixels)
    prompt = build_prompt(question, options, (model_width, model_height), config.prompt)
    image = image_rgb
    if (model_width, model_height) != (width, height):
        image = cv2.resize(image_rgb, (model_width, model_height), interpolation=cv2.INTER_AREA)
    return InferenceRequest(
        image=np.ascontiguousarray(image), prompt=prompt, question=question, scene_only=scene_only,
        on_text=on_text, request_id=request_id,
    )


def model_image_size(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """(width, height) of the image handed to the model: `size` scaled down, aspect kept, to max_pixels."""
    width, height = size
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    new_width, new_height = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    # A side held at 1 pixel must not push the other over the cap (extreme aspect ratios).
    new_width = min(new_width, max_pixels // new_height)
    return new_width, min(new_height, max_pixels // new_width)


def finish_result(
    request: InferenceRequest,
    result: InferenceResult,
    options: Sequence[str],
    camera_size: tuple[int, int],
    depth: Optional[DepthImage] = None,
    intrinsics: Optional[CameraIntrinsics] = None,
    scene_only: Optional[bool] = None,
    config: PipelineConfig = PipelineConfig(),
) -> SpatialResult:
    """The parsed answer with boxes in `camera_size` pixels and, given depth (registered to the camera
    image) and intrinsics, a 3D position per object. Geometry losses join the parse problems. Every relation
    carries its check against the positions (config.relations); contradicted ones are named in the problems too,
    without changing the status, which says how complete the model's output was.

    `scene_only` defaults to what the request asked; True also reads the scene from the streamed, partial
    text of a full request as soon as its scene is closed.
    """
    scene_only = request.scene_only if scene_only is None else scene_only
    model_size = (request.image.shape[1], request.image.shape[0])
    parsed = parse_response(result.text, options, image_size=model_size, scene_only=scene_only)
    scene, problems = map_scene(parsed.scene, camera_size)
    if depth is not None and intrinsics is None:
        problems.append("a depth image came without camera intrinsics: no 3D positions")
    elif depth is not None:
        scene, depth_problems = _lift_scene(scene, depth, intrinsics, config)
        problems.extend(depth_problems)
    lossy = parsed.status is not AnswerStatus.COMPLETE or bool(problems)
    scene = check_scene(scene, config.relations, has_depth=depth is not None and intrinsics is not None)
    parsed = replace(
        parsed,
        scene=scene,
        problems=parsed.problems + tuple(problems) + tuple(contradictions(scene)),
        status=decide_status(parsed.answer, scene, parsed.scene_complete, scene_only, lossy),
    )
    return SpatialResult(parsed=parsed, inference=result, prompt=request.prompt, model_image_size=model_size)


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray):
        raise InvalidRequest(f"the image must be a numpy array, not {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InvalidRequest(f"the image must be RGB uint8 H x W x 3, not {image.dtype} of shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InvalidRequest(f"the image is empty (shape {image.shape})")


def _lift_scene(
    scene: SceneGraph, depth: DepthImage, intrinsics: CameraIntrinsics, config: PipelineConfig
) -> tuple[SceneGraph, list[str]]:
    objects, no_depth = [], []
    for obj in scene.objects:
        position = lift_box(
            obj.box, depth, intrinsics, scene.image_size,
            min_valid_fraction=config.min_valid_depth_fraction, max_depth=config.max_depth_m,
            shrink=config.depth_box_shrink,
        )
        if position is None:
            no_depth.append(obj.id)
        objects.append(replace(obj, position=position))
    boxes = "box" if len(no_depth) == 1 else "boxes"
    problems = [f"depth invalid inside the {boxes} of {', '.join(no_depth)}: no 3D position"] if no_depth else []
    return replace(scene, objects=tuple(objects)), problems
