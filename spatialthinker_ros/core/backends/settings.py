"""The choices and defaults of the model settings, and the one builder of create_backend's settings.

Torch-free, so the ROS parameters (ros/parameters.py) and `spatialthinker-ask` take their choices and defaults
from here without loading the model stack. Settings are named as the node's parameters everywhere outside the
backends; `backend_settings` turns them into the chosen backend's config fields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from spatialthinker_ros.core.backends.base import DEFAULT_MAX_PIXELS, GenerationConfig
from spatialthinker_ros.core.request import PATCH, QWEN_MIN_PIXELS

DEFAULT_MODEL = "OX-PIXL/SpatialThinker-7B"
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
DTYPES = ("auto", "bfloat16", "float16", "float32")                     # auto: bf16 on cuda, fp32 on cpu
ATTENTION_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")   # auto: flash_attention_2 when usable
QUANTIZATIONS = ("none", "4bit", "8bit")                                 # bitsandbytes, cuda only

# backend -> {setting (node parameter name): field of that backend's config}
_FIELDS = {
    "transformers": {"model": "model", "device": "device", "dtype": "dtype",
                     "attn_implementation": "attn_implementation", "quantization": "quantization",
                     "min_pixels": "min_pixels", "max_pixels": "max_pixels", "max_batch_size": "max_batch_size",
                     "max_new_tokens": "generation"},
    "openai": {"server_url": "server_url", "model": "model", "api_key_env": "api_key_env",
               "server_timeout": "timeout_s", "max_batch_size": "max_concurrency", "max_pixels": "max_pixels",
               "max_new_tokens": "generation"},
    "replay": {"replay_file": "replay_file", "replay_latency": "latency_s"},
}


def backend_settings(backend: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """create_backend's settings for `backend` from settings named as the node's parameters. Settings of other
    backends, and None (not given: the config's default applies), are left out."""
    if backend not in _FIELDS:
        raise ValueError(f"unknown backend {backend!r}; valid names: {', '.join(_FIELDS)}")
    settings = {}
    for name, config_field in _FIELDS[backend].items():
        value = values.get(name)
        if value is not None:
            settings[config_field] = GenerationConfig(max_new_tokens=value) if config_field == "generation" else value
    return settings


def applies_to(setting: str) -> tuple[str, ...]:
    """The backends a setting is used by."""
    return tuple(backend for backend, fields in _FIELDS.items() if setting in fields)


@dataclass(frozen=True)
class TransformersConfig:
    """How to load and run the model in-process. Defaults suit one GPU serving one robot."""

    model: str = DEFAULT_MODEL                  # hub id or local checkpoint directory
    device: str = "auto"                         # auto | cpu | cuda | cuda:N (auto = cuda when available)
    dtype: str = "auto"                          # auto (bf16 on cuda, fp32 on cpu) | bfloat16 | float16 | float32
    attn_implementation: str = "auto"            # auto = flash_attention_2 when installed and on cuda, else sdpa
    min_pixels: Optional[int] = QWEN_MIN_PIXELS  # Qwen2.5-VL's own; None keeps the checkpoint's preprocessor setting
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS   # the processor's limit (base.DEFAULT_MAX_PIXELS says why)
    quantization: str = "none"                   # none | 4bit | 8bit (bitsandbytes, cuda only)
    max_batch_size: int = 8
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    local_files_only: bool = False
    compile: bool = False                        # static KV cache; transformers then compiles decoding on cuda
    # keep the KV of recent one-question prompts, so a follow-up question about the same frame prefills only
    # what differs (off with compile, or where this transformers cannot continue a Qwen2.5-VL prompt)
    reuse_prompts: bool = True

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must name a hub id or a checkpoint directory")
        if not DEVICE.fullmatch(self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if not self.attn_implementation:
            raise ValueError("attn_implementation must be auto or a transformers attention implementation")
        for name in ("min_pixels", "max_pixels"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < PATCH * PATCH):
                raise ValueError(f"{name} must be None or an int >= 784 (one 28x28 cell), not {value!r}")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) exceeds max_pixels ({self.max_pixels})")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {self.quantization!r}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, not {self.max_batch_size}")
