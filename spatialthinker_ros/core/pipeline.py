"""The ROS-free flow shared by the CLI and the ROS node: frame + question -> request, raw text -> result.

Between the two calls a backend turns the request into text; keeping both ends here means the CLI, the node
and the tests agree on image sizes, prompt and status by construction. The rules those calls apply (what a
caller may ask, what size the model is given, the retry after out of memory) are in request.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

import cv2
import numpy as np

from spatialthinker_ros.core.conformal import Calibration, answer_prediction_set
from spatialthinker_ros.core.geometry import (CameraIntrinsics, DepthImage, LiftConfig, clamped_boxes, lift_box,
                                              map_scene)
from spatialthinker_ros.core.parsing import decide_status, parse_response
from spatialthinker_ros.core.backends.base import Backend
from spatialthinker_ros.core.prompt import PromptConfig, Question, answer_options, build_prompt, option_letter
from spatialthinker_ros.core.relations import RelationCheckConfig, check_scene, contradictions
from spatialthinker_ros.core.request import (MAX_REQUEST_IMAGE_PIXELS, PATCH, ImageError, check_aspect,
                                             check_image_pixels, check_question, check_rgb, is_out_of_memory,
                                             model_image_size, oom_retry_pixels, request_image_error)
from spatialthinker_ros.core.types import (
    AnswerStatus,
    BackendError,
    InferenceRequest,
    InferenceResult,
    ParsedResponse,
    SceneGraph,
    SpatialResult,
)


@dataclass(frozen=True)
class PipelineConfig:
    """Request limits, the size the model is given, depth-lifting settings (geometry.LiftConfig) and the
    checks of the model's relations against the 3D positions (core/relations.py)."""

    prompt: PromptConfig = PromptConfig()
    # Larger frames are downscaled before the prompt states their size: the model's cost grows with pixels,
    # and Qwen2.5-VL would otherwise see up to 12.8 MP.
    max_input_pixels: int = 1920 * 1080
    # Set by for_backend for a backend whose image processor is not ours (request.model_image_size).
    processor_max_pixels: Optional[int] = None
    max_request_image_pixels: int = MAX_REQUEST_IMAGE_PIXELS
    lift: LiftConfig = LiftConfig()
    relations: RelationCheckConfig = RelationCheckConfig()
    # Prediction sets over the options (core/conformal.py); None: every answer's set is empty, coverage 0.
    calibration: Optional[Calibration] = None

    def __post_init__(self) -> None:
        for name in ("max_input_pixels", "max_request_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if self.processor_max_pixels is not None and self.processor_max_pixels < PATCH * PATCH:
            raise ValueError(f"processor_max_pixels must be None or >= {PATCH * PATCH}, "
                             f"not {self.processor_max_pixels}")

    def for_backend(self, backend: Backend) -> PipelineConfig:
        """This config with the image cap the backend needs applied before the prompt is made (max_pixels for
        an OpenAI-compatible server; none for backends that resize in-process or ignore the image)."""
        return replace(self, processor_max_pixels=backend.max_image_pixels)


def prepare_request(
    image_rgb: np.ndarray,
    question: str,
    options: Sequence[str],
    config: PipelineConfig = PipelineConfig(),
    scene_only: bool = False,
    on_text: Optional[Callable[[str, int], None]] = None,
    request_id: str = "",
    asked: Optional[Question] = None,
) -> InferenceRequest:
    """A validated request whose prompt states the size of the image the model will see.

    `asked` is check_question(question, options) when the caller already checked them (before picking a frame);
    the prompt is built once, here. The image is passed on as is (not copied) when it needs no downscaling: do
    not write to it afterwards. Raises InvalidRequest (a RequestError) for anything request.py refuses.
    """
    asked = asked or check_question(question, options, config.prompt)
    model_width, model_height = check_image(image_rgb, config)
    height, width = image_rgb.shape[:2]
    image = image_rgb
    if (model_width, model_height) != (width, height):
        image = cv2.resize(image_rgb, (model_width, model_height), interpolation=cv2.INTER_AREA)
    return InferenceRequest(
        image=np.ascontiguousarray(image), prompt=build_prompt(asked, (model_width, model_height), config.prompt),
        question=question, scene_only=scene_only, on_text=on_text, request_id=request_id, asked=asked,
    )


def check_image(image_rgb: np.ndarray, config: PipelineConfig = PipelineConfig()) -> tuple[int, int]:
    """The request.py rules on the image a question is about; returns the (width, height) the model is given."""
    check_rgb(image_rgb)
    height, width = image_rgb.shape[:2]
    try:
        check_image_pixels(width, height, config.max_request_image_pixels)
    except ImageError as exc:
        raise request_image_error(exc) from None
    size = model_image_size((width, height), config.max_input_pixels, config.processor_max_pixels)
    check_aspect(size)
    return size


def smaller_request(request: InferenceRequest, image_rgb: np.ndarray, config: PipelineConfig,
                    outcome: InferenceResult | BackendError) -> Optional[InferenceRequest]:
    """The one retry after the backend ran out of memory on `request`: the same question about `image_rgb` (its
    source) at half the size per side; None when the outcome needs no retry or the image is already small."""
    if not is_out_of_memory(outcome):
        return None
    pixels = oom_retry_pixels((request.image.shape[1], request.image.shape[0]))
    if pixels is None:
        return None
    return prepare_request(image_rgb, request.question, (), replace(config, max_input_pixels=pixels),
                           scene_only=request.scene_only, on_text=request.on_text, request_id=request.request_id,
                           asked=request.asked)


RETRIED_NO_SET = ("no prediction set: answered at a smaller image size after running out of memory, and the "
                  "calibration holds only for the size it was made at")


def finish_result(
    request: InferenceRequest,
    result: InferenceResult,
    options: Sequence[str],
    camera_size: tuple[int, int],
    depth: Optional[DepthImage] = None,
    intrinsics: Optional[CameraIntrinsics] = None,
    scene_only: Optional[bool] = None,
    config: PipelineConfig = PipelineConfig(),
    retried: bool = False,
) -> SpatialResult:
    """The parsed answer with boxes in `camera_size` pixels and, given depth (registered to the camera
    image) and intrinsics, a 3D position per object. Geometry losses join the parse problems. Every relation
    carries its check against the positions (config.relations); contradicted ones are named in the problems too,
    without changing the status, which says how complete the model's output was.

    `scene_only` defaults to what the request asked; True also reads the scene from the streamed, partial
    text of a full request as soon as its scene is closed. Without `options` the answer is matched against
    the options the question carries inline, if any (prompt.answer_options). The backend's option probabilities
    give the prediction set under config.calibration, except for an answer `retried` at a smaller image size after
    running out of memory: the calibration holds for the full size, so it gets none (coverage 0; status_message
    says why).
    """
    scene_only = request.scene_only if scene_only is None else scene_only
    model_size = (request.image.shape[1], request.image.shape[0])
    options = answer_options(request.question, options)
    parsed = parse_response(result.text, options, image_size=model_size, scene_only=scene_only)
    scene, problems = map_scene(parsed.scene, camera_size)
    if depth is not None and intrinsics is None:
        problems.append("a depth image came without camera intrinsics: no 3D positions")
    elif depth is not None:
        scene, depth_problems = _lift_scene(scene, depth, intrinsics, config)
        problems.extend(depth_problems)
    lossy = parsed.status is not AnswerStatus.COMPLETE or bool(problems)
    notes = clamped_boxes(parsed.scene) + ambiguous_positions(scene)   # said, without changing the status
    scene = check_scene(scene, config.relations, has_depth=depth is not None and intrinsics is not None)
    probabilities, missing = option_probabilities(result, options, scene_only)
    letters = [option_letter(i) for i in range(len(options))]
    if retried and config.calibration is not None and probabilities:
        prediction_set, coverage = [], 0.0
        missing += (RETRIED_NO_SET,)
    else:
        prediction_set, coverage = answer_prediction_set(probabilities, letters, config.calibration)
    parsed = replace(
        parsed,
        scene=scene,
        problems=parsed.problems + tuple(problems) + tuple(notes) + tuple(contradictions(scene)) + missing,
        status=decide_status(parsed.answer, scene, parsed.scene_complete, scene_only, lossy),
        option_probabilities=probabilities,
    )
    return SpatialResult(parsed=parsed, inference=result, prompt=request.prompt, model_image_size=model_size,
                         prediction_set=tuple(prediction_set), prediction_set_coverage=coverage)


def ambiguous_positions(scene: SceneGraph) -> list[str]:
    """A note naming each object whose 3D position is ambiguous (depth_ambiguous: two surfaces in its box could be
    it), so an answer that is complete still says which positions a planner should not trust blindly."""
    return [f"{obj.id}: position ambiguous (two depth surfaces in its box could be the object)"
            for obj in scene.objects if obj.position is not None and obj.position.ambiguous]


def option_probabilities(result: InferenceResult, options: Sequence[str],
                         scene_only: bool) -> tuple[tuple[float, ...], tuple[str, ...]]:
    """The backend's option probabilities when they fit the options answered, and why there are none otherwise.

    The reason joins the answer's problems (status_message) without changing its status: the answer itself is
    whole, as does a backend's note on probabilities it gave (how a reading not at the written letter was made).
    A free-form question or a scene-only request has none and needs no reason."""
    if not options or scene_only:
        return (), ()
    probabilities = result.option_probabilities
    if not probabilities:
        why = result.option_probabilities_note or "the backend gives no option probabilities"
        return (), (f"no option probabilities: {why}",)
    if len(probabilities) != len(options):
        return (), (f"no option probabilities: the backend gave {len(probabilities)} for {len(options)} options",)
    # a reading made other than at the letter the model wrote (e.g. one step further, as if "(" followed) says so
    how = (f"option probabilities {result.option_probabilities_note}",) if result.option_probabilities_note else ()
    return tuple(probabilities), how


def _lift_scene(
    scene: SceneGraph, depth: DepthImage, intrinsics: CameraIntrinsics, config: PipelineConfig
) -> tuple[SceneGraph, list[str]]:
    objects, no_depth = [], []
    for obj in scene.objects:
        position = lift_box(obj.box, depth, intrinsics, scene.image_size, config.lift,
                            depth_noise_per_m=config.relations.depth_noise_per_m)
        if position is None:
            no_depth.append(obj.id)
        objects.append(replace(obj, position=position))
    boxes = "box" if len(no_depth) == 1 else "boxes"
    problems = [f"depth invalid inside the {boxes} of {', '.join(no_depth)}: no 3D position"] if no_depth else []
    return replace(scene, objects=tuple(objects)), problems


def answer_dict(parsed: ParsedResponse, inference: InferenceResult, question: str,
                options: Sequence[str]) -> dict[str, Any]:
    """A finished answer as JSON-ready data (the CLI's output, the demo's answer files): boxes in camera pixels,
    positions and sizes in metres (None without depth), status as its lower-case name, option probabilities as a
    list in option order like SpatialAnswer's ([] when none)."""
    objects = []
    for obj in parsed.scene.objects:
        box, p = obj.box, obj.position
        objects.append({
            "id": obj.id,
            "label": obj.label,
            "box": [round(v, 2) for v in (box.x_min, box.y_min, box.x_max, box.y_max)],
            "position_m": None if p is None else {"x": round(p.x, 4), "y": round(p.y, 4), "z": round(p.z, 4)},
            "size_m": None if p is None else {"x": round(p.size_x, 4), "y": round(p.size_y, 4),
                                              "z": round(p.size_z, 4)},
            "depth_spread_m": None if p is None else round(p.depth_spread, 4),
            "depth_ambiguous": None if p is None else p.ambiguous,
        })
    return {
        "question": question,
        "options": list(options),
        "answer": parsed.answer,
        "choice": parsed.choice,
        "option_probabilities": [round(p, 6) for p in parsed.option_probabilities],
        "status": parsed.status.name.lower(),
        "status_message": parsed.status_message,
        "observation": parsed.observation,
        "reasoning": parsed.reasoning,
        "objects": objects,
        "relations": [{"subject": r.subject, "predicate": r.predicate, "object": r.object,
                       "check": r.check.name.lower(), "check_note": r.check_note}
                      for r in parsed.scene.relations],
        "image_size": list(parsed.scene.image_size),
        "model": inference.model,
        "prompt_tokens": inference.prompt_tokens,
        "completion_tokens": inference.completion_tokens,
        "seconds": round(inference.seconds, 3),
        "raw_response": inference.text,
    }
