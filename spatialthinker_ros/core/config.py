"""Every node parameter, typed: name, type, default, range, choices, description, when a change applies and the
backends it applies to. ROS-free: ros/parameters.py declares the node's parameters from it, `spatialthinker-ask`
and `spatialthinker-eval` take their shared options' defaults, help and choices from it, and a test checks
config/spatialthinker.yaml against it. Defaults of what the core configures come from the core's own config types.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Optional

from spatialthinker_ros.core.backends import BACKEND_NAMES
from spatialthinker_ros.core.backends.base import GenerationConfig
from spatialthinker_ros.core.backends.openai_backend import OpenAIConfig
from spatialthinker_ros.core.backends.replay_backend import ReplayConfig
from spatialthinker_ros.core.backends.settings import (ATTENTION_IMPLEMENTATIONS, DEVICE, DTYPES, QUANTIZATIONS,
                                                       TransformersConfig, applies_to)
from spatialthinker_ros.core.backends.base import Backend
from spatialthinker_ros.core.checkpoint import checkpoint_fingerprint
from spatialthinker_ros.core.conformal import SETUP_FIELDS, CalibrationSetup
from spatialthinker_ros.core.geometry import DEFAULT_DEPTH_SCALE, LiftConfig
from spatialthinker_ros.core.pipeline import PipelineConfig
from spatialthinker_ros.core.prompt import STYLES, PromptConfig
from spatialthinker_ros.core.relations import RelationCheckConfig
from spatialthinker_ros.core.request import DEPTH_SYNC_TOLERANCE_S
from spatialthinker_ros.core.scheduling import DEFAULT_QUEUE_SIZE
from spatialthinker_ros.core.validation import validate_model_reference, validate_server_url

Check = Callable[[Any], Optional[str]]   # returns the reason a value is invalid, or None


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


WHEN = {"next request": "applies to the next request", "activate": "applies at the next activate",
        "configure": "applies at the next configure", "start": "read once when the node starts"}


@dataclass(frozen=True)
class ParamSpec:
    """One parameter. Its type is its default's (bool, int, float, str, or list of str)."""

    name: str
    default: Any
    description: str
    check: Optional[Check] = None        # a rule beyond range and choices
    applies: str = "configure"           # when a change takes effect: a key of WHEN
    range: Optional[tuple[float, float]] = None   # inclusive
    choices: tuple[str, ...] = ()

    @property
    def type(self) -> type:
        return type(self.default)

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends this parameter configures; () when it is not a backend setting."""
        return applies_to(self.name)

    @property
    def int_range(self) -> Optional[tuple[int, int]]:
        return (int(self.range[0]), int(self.range[1])) if self.range and self.type is int else None

    @property
    def float_range(self) -> Optional[tuple[float, float]]:
        return self.range if self.range and self.type is float else None

    def rule_problem(self, value: Any) -> Optional[str]:
        """Why `value` breaks this parameter's choices or rule, or None (ROS itself enforces type and range)."""
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}"
        return self.check(value) if self.check else None

    def problem(self, value: Any) -> Optional[str]:
        """Why `value` is not valid for this parameter (type, range, choices, rule), or None."""
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not self.type or (self.type is list and not all(isinstance(v, str) for v in value)):
            return f"must be of type {self.type.__name__}"
        if self.range and not (self.range[0] <= value <= self.range[1] and math.isfinite(value)):
            return f"must be in [{self.range[0]}, {self.range[1]}]"
        return self.rule_problem(value)


_TRANSFORMERS, _OPENAI, _REPLAY = TransformersConfig(), OpenAIConfig(), ReplayConfig(replay_file="")
_PIPELINE = PipelineConfig()

PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec("backend", BACKEND_NAMES[0],
              "transformers (in-process GPU) | openai (OpenAI-compatible server) | replay", choices=BACKEND_NAMES),
    ParamSpec("model", _TRANSFORMERS.model, "hub id or local checkpoint directory; model name for openai",
              from_validator(validate_model_reference)),
    ParamSpec("device", _TRANSFORMERS.device, "auto | cpu | cuda | cuda:N (transformers)", device_check),
    ParamSpec("dtype", _TRANSFORMERS.dtype, "auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float16 | float32",
              choices=DTYPES),
    ParamSpec("attn_implementation", _TRANSFORMERS.attn_implementation, "auto | sdpa | eager | flash_attention_2",
              choices=ATTENTION_IMPLEMENTATIONS),
    ParamSpec("quantization", _TRANSFORMERS.quantization, "none | 4bit | 8bit (bitsandbytes)", choices=QUANTIZATIONS),
    ParamSpec("max_pixels", _TRANSFORMERS.max_pixels,
              "processor max_pixels: image tokens = pixels / 784 (openai: larger frames are downscaled before sending)",
              range=(3136, 16777216)),
    ParamSpec("min_pixels", _TRANSFORMERS.min_pixels, "processor min_pixels", range=(784, 16777216)),
    ParamSpec("max_new_tokens", GenerationConfig().max_new_tokens, "generation limit per answer", range=(16, 8192)),
    ParamSpec("max_batch_size", _TRANSFORMERS.max_batch_size,
              "requests generated together (transformers) or in flight (openai)", range=(1, 64)),
    ParamSpec("server_url", _OPENAI.server_url, "openai: base URL of the server (http or https)",
              from_validator(validate_server_url)),
    ParamSpec("api_key_env", _OPENAI.api_key_env,
              "openai: NAME of the environment variable with the API key (the key is never a parameter)",
              lambda v: None if v.replace("_", "").isalnum() else "must be an environment variable name"),
    ParamSpec("server_timeout", _OPENAI.timeout_s, "openai: seconds per HTTP request", range=(0.1, 3600.0)),
    ParamSpec("replay_file", _REPLAY.replay_file, "replay: JSON Lines file of {question, response}"),
    ParamSpec("replay_latency", _REPLAY.latency_s, "replay: seconds each answer takes, to rehearse timeouts and load",
              range=(0.0, 3600.0)),
    ParamSpec("prompt_style", _PIPELINE.prompt.style,
              "model_card: the model card's template; training: the training prompt", choices=STYLES),
    ParamSpec("max_question_chars", _PIPELINE.prompt.max_question_chars, "longer questions get ERROR_INVALID_REQUEST",
              range=(1, 20000)),
    ParamSpec("max_input_pixels", _PIPELINE.max_input_pixels,
              "frames with more pixels are downscaled before the model sees them", range=(3136, 16777216)),
    ParamSpec("max_request_image_pixels", _PIPELINE.max_request_image_pixels,
              "larger request or camera images are refused",
              range=(1, 67108864)),
    ParamSpec("calibration_file", "",
              "spatialthinker-eval calibrate JSON: each answer's prediction_set over its options; '' = none. Refused "
              "at configure, once the model has loaded (checkpoint: the weights' fingerprint, or the model an openai "
              f"server reports), when calibrated with another {', '.join(SETUP_FIELDS[:-1])} or {SETUP_FIELDS[-1]}"),
    ParamSpec("queue_size", DEFAULT_QUEUE_SIZE, "requests waiting for the model; more get ERROR_BUSY at once",
              range=(1, 10000), applies="activate"),
    ParamSpec("request_timeout", 300.0, "seconds from acceptance to answer, then ERROR_TIMEOUT",
              range=(0.1, 86400.0), applies="next request"),
    ParamSpec("max_image_age", 1.0, "seconds; older camera frames get ERROR_STALE_IMAGE; 0 = no limit",
              range=(0.0, 86400.0), applies="next request"),
    ParamSpec("cameras", ["default"],
              "camera names; 'default' reads image, depth, camera_info; X reads X/image, X/depth, X/camera_info",
              cameras_check),
    ParamSpec("image_transport", "raw", "raw (<cam>/image) | compressed (<cam>/image/compressed)",
              choices=("raw", "compressed")),
    ParamSpec("image_reliability", "best_effort", "QoS of camera subscriptions: best_effort (sensor data) | reliable",
              choices=("best_effort", "reliable"), applies="activate"),
    ParamSpec("use_depth", True, "subscribe to <cam>/depth and <cam>/camera_info and add 3D positions",
              applies="activate"),
    ParamSpec("depth_scale", DEFAULT_DEPTH_SCALE, "metres per unit of 16UC1 depth (0.001 = millimetres)",
              range=(1e-6, 10.0)),
    ParamSpec("min_depth", _PIPELINE.lift.min_depth_m,
              "metres: nearer depth readings are invalid (below a wrist camera's 7 cm: RealSense D405)",
              range=(0.001, 10.0)),
    ParamSpec("max_depth", _PIPELINE.lift.max_depth_m, "metres: farther depth readings are invalid; above min_depth",
              range=(0.01, 1000.0)),
    ParamSpec("depth_sync_tolerance", DEPTH_SYNC_TOLERANCE_S, "seconds between colour and paired depth stamps",
              range=(0.0, 10.0), applies="next request"),
    ParamSpec("check_relations", RelationCheckConfig().enabled,
              "check each relation of the answer against the 3D positions (SceneRelation.check); false = all "
              "NOT_CHECKED", applies="next request"),
    ParamSpec("relation_margin", RelationCheckConfig().margin_m,
              "metres: base margin a position difference must exceed (plus extents and depth noise), else "
              "UNCERTAIN", range=(0.0, 10.0), applies="next request"),
    ParamSpec("keep_frame_memory", True, "reuse freed camera-frame buffers instead of returning them to the OS "
              "(glibc): fewer page faults and less CPU at raw 1080p, up to 128 MiB kept free", applies="start"),
    ParamSpec("publish_debug_image", True, "publish ~/debug_image when someone subscribes", applies="next request"),
    ParamSpec("publish_markers", True, "publish ~/markers", applies="next request"),
    ParamSpec("marker_lifetime", 5.0, "seconds markers stay in RViz; 0 = forever", range=(0.0, 3600.0),
              applies="next request"),
    ParamSpec("autostart", True, "configure and activate on start; false = wait for a lifecycle manager",
              applies="start"),
)
BY_NAME = {spec.name: spec for spec in PARAMETERS}


def defaults() -> dict[str, Any]:
    """Every parameter's default, by name."""
    return {spec.name: spec.default for spec in PARAMETERS}


def pipeline_config_from(values: Mapping[str, Any], **fields: Any) -> PipelineConfig:
    """The PipelineConfig that the parameters prompt_style, max_question_chars, max_input_pixels and
    max_request_image_pixels set (`values` by parameter name: the node's parameters, or the command line's options),
    plus any other PipelineConfig `fields`. ValueError for a value the config refuses."""
    prompt = PromptConfig(style=values["prompt_style"], max_question_chars=values["max_question_chars"])
    return PipelineConfig(prompt=prompt, max_input_pixels=values["max_input_pixels"],
                          max_request_image_pixels=values["max_request_image_pixels"], **fields)


def lift_config_from(values: Mapping[str, Any]) -> LiftConfig:
    """The LiftConfig that the parameters min_depth and max_depth set (`values` by parameter name); ValueError when
    max_depth is not above min_depth."""
    return replace(_PIPELINE.lift, min_depth_m=values["min_depth"], max_depth_m=values["max_depth"])


def answering_setup(backend: Backend, values: Mapping[str, Any]) -> CalibrationSetup:
    """The setup a calibration must hold for, as the loaded `backend` answers: its weights' fingerprint, resolved
    dtype, quantization, image limits and whether letters are read past generate (transformers), or the model id
    its server reports (openai), with the prompt parameters prompt_style and max_input_pixels in `values` (the
    node's parameters, or the command line's options). ValueError when the weights cannot be fingerprinted;
    BackendError when the server cannot say which model it serves."""
    prompt = dict(max_input_pixels=values["max_input_pixels"], prompt_style=values["prompt_style"])
    if backend.name == "replay":
        return CalibrationSetup.replay(**prompt)
    config = backend.config
    if backend.name == "openai":
        return CalibrationSetup(model=config.model, backend="openai", checkpoint=f"served {backend.served_model()}",
                                dtype=None, quantization=None, min_pixels=None, max_pixels=config.max_pixels,
                                letters_continue=None, **prompt)
    return CalibrationSetup(model=config.model, backend=backend.name, checkpoint=checkpoint_fingerprint(config.model),
                            dtype=backend.dtype, quantization=config.quantization, min_pixels=config.min_pixels,
                            max_pixels=config.max_pixels, letters_continue=backend.letters_continue, **prompt)
