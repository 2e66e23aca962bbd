"""Every node parameter: default, description, validation, and when a change applies.

Choices and defaults of what the core configures come from the core's config types (no copies here).
config/spatialthinker.yaml and docs/node.md list the same parameters; test_parameters.py keeps them in step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult

from spatialthinker_ros.core.backends import BACKEND_NAMES
from spatialthinker_ros.core.backends.base import GenerationConfig
from spatialthinker_ros.core.backends.openai_backend import OpenAIConfig
from spatialthinker_ros.core.backends.replay_backend import ReplayConfig
from spatialthinker_ros.core.backends.settings import (ATTENTION_IMPLEMENTATIONS, DEVICE, DTYPES, QUANTIZATIONS,
                                                       TransformersConfig)
from spatialthinker_ros.core.pipeline import PipelineConfig
from spatialthinker_ros.core.prompt import STYLES
from spatialthinker_ros.core.relations import RelationCheckConfig
from spatialthinker_ros.core.request import DEPTH_SYNC_TOLERANCE_S, QWEN_MIN_PIXELS
from spatialthinker_ros.core.validation import validate_model_reference, validate_server_url

Check = Callable[[Any], Optional[str]]   # returns the reason a value is invalid, or None


def one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def at_least(low: float, finite: bool = True) -> Check:
    return lambda v: None if v >= low and (not finite or math.isfinite(v)) else f"must be a finite number >= {low}"


def device_check(v: str) -> Optional[str]:
    return None if DEVICE.fullmatch(v) else "must be auto, cpu, cuda or cuda:N"


def cameras_check(names: list[str]) -> Optional[str]:
    if not names:
        return "needs at least one camera"
    if len(set(names)) != len(names):
        return "camera names must be unique"
    for name in names:
        if not name or not all(c.isalnum() or c == "_" for c in name) or name[0].isdigit():
            return f"camera name {name!r} is not a valid ROS name (letters, digits, underscores)"
    return None


def from_validator(validate: Callable[[Any], Any]) -> Check:
    """A Check from a core validator that raises ValueError with the reason."""
    def check(value: Any) -> Optional[str]:
        try:
            validate(value)
        except ValueError as exc:
            return str(exc)
        return None
    return check


@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: Any
    description: str
    check: Optional[Check] = None
    applies: str = "configure"   # when a change takes effect: "next request", "configure" or "start" (read once)
    int_range: Optional[tuple[int, int]] = None
    float_range: Optional[tuple[float, float]] = None


_TRANSFORMERS, _OPENAI, _REPLAY = TransformersConfig(), OpenAIConfig(), ReplayConfig(replay_file="")
_PIPELINE = PipelineConfig()

PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec("backend", BACKEND_NAMES[0],
              "transformers (in-process GPU) | openai (OpenAI-compatible server) | replay", one_of(*BACKEND_NAMES)),
    ParamSpec("model", _TRANSFORMERS.model, "hub id or local checkpoint directory; model name for openai",
              from_validator(validate_model_reference)),
    ParamSpec("device", _TRANSFORMERS.device, "auto | cpu | cuda | cuda:N (transformers)", device_check),
    ParamSpec("dtype", _TRANSFORMERS.dtype, "auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float16 | float32",
              one_of(*DTYPES)),
    ParamSpec("attn_implementation", _TRANSFORMERS.attn_implementation, "auto | sdpa | eager | flash_attention_2",
              one_of(*ATTENTION_IMPLEMENTATIONS)),
    ParamSpec("quantization", _TRANSFORMERS.quantization, "none | 4bit | 8bit (bitsandbytes)", one_of(*QUANTIZATIONS)),
    ParamSpec("max_pixels", _TRANSFORMERS.max_pixels,
              "processor max_pixels: image tokens = pixels / 784 (openai: larger frames are downscaled before sending)",
              int_range=(3136, 16777216)),
    ParamSpec("min_pixels", QWEN_MIN_PIXELS, "processor min_pixels", int_range=(784, 16777216)),
    ParamSpec("max_new_tokens", GenerationConfig().max_new_tokens, "generation limit per answer", int_range=(16, 8192)),
    ParamSpec("max_batch_size", _TRANSFORMERS.max_batch_size,
              "requests generated together (transformers) or in flight (openai)", int_range=(1, 64)),
    ParamSpec("server_url", _OPENAI.server_url, "openai: base URL of the server (http or https)",
              from_validator(validate_server_url)),
    ParamSpec("api_key_env", _OPENAI.api_key_env,
              "openai: NAME of the environment variable with the API key (the key is never a parameter)",
              lambda v: None if v.replace("_", "").isalnum() else "must be an environment variable name"),
    ParamSpec("server_timeout", _OPENAI.timeout_s, "openai: seconds per HTTP request", float_range=(0.1, 3600.0)),
    ParamSpec("replay_file", _REPLAY.replay_file, "replay: JSON Lines file of {question, response}"),
    ParamSpec("replay_latency", _REPLAY.latency_s, "replay: seconds each answer takes, to rehearse timeouts and load",
              float_range=(0.0, 3600.0)),
    ParamSpec("prompt_style", _PIPELINE.prompt.style, " | ".join(STYLES), one_of(*STYLES)),
    ParamSpec("max_question_chars", _PIPELINE.prompt.max_question_chars, "longer questions get ERROR_INVALID_REQUEST",
              int_range=(1, 20000)),
    ParamSpec("max_input_pixels", _PIPELINE.max_input_pixels,
              "frames with more pixels are downscaled before the model sees them", int_range=(3136, 16777216)),
    ParamSpec("max_request_image_pixels", _PIPELINE.max_request_image_pixels,
              "larger request or camera images are refused",
              int_range=(1, 67108864)),
    ParamSpec("calibration_file", "",
              "spatialthinker-eval calibrate JSON: each answer's prediction_set over its options; '' = none. "
              "Refused at configure when calibrated with another backend, model, max_pixels, max_input_pixels or "
              "prompt_style"),
    ParamSpec("queue_size", 8, "requests waiting for the model; more get ERROR_BUSY at once", int_range=(1, 10000)),
    ParamSpec("request_timeout", 300.0, "seconds from acceptance to answer, then ERROR_TIMEOUT",
              float_range=(0.1, 86400.0), applies="next request"),
    ParamSpec("max_image_age", 1.0, "seconds; older camera frames get ERROR_STALE_IMAGE; 0 = no limit",
              float_range=(0.0, 86400.0), applies="next request"),
    ParamSpec("cameras", ["default"],
              "camera names; 'default' reads image, depth, camera_info; X reads X/image, X/depth, X/camera_info",
              cameras_check),
    ParamSpec("image_transport", "raw", "raw (<cam>/image) | compressed (<cam>/image/compressed)",
              one_of("raw", "compressed")),
    ParamSpec("image_reliability", "best_effort", "QoS of camera subscriptions: best_effort (sensor data) | reliable",
              one_of("best_effort", "reliable")),
    ParamSpec("use_depth", True, "subscribe to <cam>/depth and <cam>/camera_info and add 3D positions"),
    ParamSpec("depth_scale", 0.001, "metres per unit of 16UC1 depth (0.001 = millimetres)",
              float_range=(1e-6, 10.0)),
    ParamSpec("depth_sync_tolerance", DEPTH_SYNC_TOLERANCE_S, "seconds between colour and paired depth stamps",
              float_range=(0.0, 10.0), applies="next request"),
    ParamSpec("check_relations", RelationCheckConfig().enabled,
              "check each relation of the answer against the 3D positions (SceneRelation.check); false = all "
              "NOT_CHECKED", applies="next request"),
    ParamSpec("relation_margin", RelationCheckConfig().margin_m,
              "metres: base margin a position difference must exceed (plus extents and depth noise), else "
              "UNCERTAIN", float_range=(0.0, 10.0), applies="next request"),
    ParamSpec("keep_frame_memory", True, "reuse freed camera-frame buffers instead of returning them to the OS "
              "(glibc): fewer page faults and less CPU at raw 1080p, up to 128 MiB kept free", applies="start"),
    ParamSpec("publish_debug_image", True, "publish ~/debug_image when someone subscribes", applies="next request"),
    ParamSpec("publish_markers", True, "publish ~/markers", applies="next request"),
    ParamSpec("marker_lifetime", 5.0, "seconds markers stay in RViz; 0 = forever", float_range=(0.0, 3600.0),
              applies="next request"),
    ParamSpec("autostart", True, "configure and activate on start; false = wait for a lifecycle manager",
              applies="start"),
)
BY_NAME = {spec.name: spec for spec in PARAMETERS}
_WHEN = {"next request": "applies to the next request", "configure": "applies at the next configure",
         "start": "read once when the node starts"}


def descriptor(spec: ParamSpec) -> ParameterDescriptor:
    d = ParameterDescriptor(name=spec.name, description=f"{spec.description} ({_WHEN[spec.applies]})")
    if spec.int_range:
        d.integer_range = [IntegerRange(from_value=spec.int_range[0], to_value=spec.int_range[1], step=0)]
    if spec.float_range:
        d.floating_point_range = [FloatingPointRange(from_value=spec.float_range[0], to_value=spec.float_range[1],
                                                     step=0.0)]
    return d


def check_parameters(parameters) -> SetParametersResult:
    """on-set callback: rejects the whole set if any value is invalid, with the reason."""
    for parameter in parameters:
        spec = BY_NAME.get(parameter.name)
        if spec is None or spec.check is None:
            continue
        reason = spec.check(parameter.value)
        if reason:
            return SetParametersResult(successful=False, reason=f"{parameter.name}={parameter.value!r}: {reason}")
    return SetParametersResult(successful=True)
