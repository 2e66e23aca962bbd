"""Loading a Qwen2.5-VL checkpoint: device, dtype and attention resolved from the settings, the checkpoint checked,
the processor's pixel limits; and what the installed transformers can do."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers import AutoConfig, AutoProcessor, Qwen2_5_VLForConditionalGeneration
from transformers.generation import GenerateDecoderOnlyOutput
from transformers.utils import is_flash_attn_2_available

from spatialthinker_ros.core.backends.settings import TransformersConfig
from spatialthinker_ros.core.checkpoint import local_checkpoint
from spatialthinker_ros.core.text import excerpt
from spatialthinker_ros.core.types import BackendError, BackendErrorKind

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}   # settings.DTYPES
# transformers renamed from_pretrained's torch_dtype to dtype in 4.56; an unknown name would be silently ignored.
DTYPE_ARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
# Continuing generation from a prompt's KV cache relies on how transformers positions the uncached tokens of a
# Qwen2.5-VL prompt (the image's stored rope offset); verified with this version, older ones prefill whole prompts.
PROMPT_REUSE = Version(transformers.__version__) >= Version("5.23")
# Image embeddings computed here (so they can be kept) reach generate as `mm_encoder_outputs` (transformers 5.2x).
PRECOMPUTED_IMAGES = "mm_encoder_outputs" in inspect.signature(Qwen2_5_VLForConditionalGeneration.forward).parameters
# The KV cache's name as generate takes it and returns it: transformers 5.2x renamed past_key_values to cache, and
# the old name warns (FutureWarning) until 6.0 removes it.
CACHE = ("cache" if "cache" in {f.name for f in dataclasses.fields(GenerateDecoderOnlyOutput)}
         else "past_key_values")
# What a checkpoint's generation_config.json may add to decoding, made neutral: our GenerationConfig is the whole
# decoding spec, and generate runs these processors before the letter probe, which must read the model's own scores.
# Only the names this transformers knows (an unknown one would reach the model's forward).
NEUTRAL_DECODING = {name: value for name, value in {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "sequence_bias": None, "min_length": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "exponential_decay_length_penalty": None, "remove_invalid_values": False, "guidance_scale": None,
    "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "top_h": None,
    "watermarking_config": None,
}.items() if hasattr(transformers.GenerationConfig(), name)}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendError(BackendErrorKind.UNAVAILABLE, f"device {device!r} was asked for but CUDA is not available")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise BackendError(
                BackendErrorKind.UNAVAILABLE,
                f"device {device!r} was asked for but only {torch.cuda.device_count()} CUDA device(s) exist",
            )
    return resolved


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_attention(name: str, device: torch.device, dtype: torch.dtype) -> str:
    if name != "auto":
        return name
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa"


def load(config: TransformersConfig, device: torch.device, dtype: torch.dtype, attention: str) -> tuple[Any, Any]:
    """(model in eval mode, processor) of config.model; BackendError(UNAVAILABLE) saying why it cannot load."""
    source = _model_source(config.model)
    quantization = _quantization_config(config.quantization, device, dtype)
    try:
        model_config = AutoConfig.from_pretrained(source, local_files_only=config.local_files_only)
    except Exception as exc:
        raise BackendError(
            BackendErrorKind.UNAVAILABLE,
            f"cannot load model {config.model!r} (not a checkpoint directory, and not a hub id that is cached or "
            f"downloadable here): {describe(exc)}",
        ) from exc
    if model_config.model_type != "qwen2_5_vl":
        raise BackendError(
            BackendErrorKind.UNAVAILABLE,
            f"model {config.model!r} is not a Qwen2.5-VL checkpoint (model_type {model_config.model_type!r})",
        )
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            source,
            config=model_config,
            attn_implementation=attention,
            device_map={"": str(device)},
            quantization_config=quantization,
            local_files_only=config.local_files_only,
            **{DTYPE_ARG: dtype},
        )
        processor = AutoProcessor.from_pretrained(source, local_files_only=config.local_files_only)
    except Exception as exc:
        raise BackendError(BackendErrorKind.UNAVAILABLE, f"cannot load model {config.model!r}: {describe(exc)}") from exc
    sequences = {name: getattr(model.generation_config, name, None) or 1 for name in ("num_beams", "num_return_sequences")}
    if max(sequences.values()) > 1:
        asked = ", ".join(f"{name} {value}" for name, value in sequences.items() if value > 1)
        raise BackendError(
            BackendErrorKind.UNAVAILABLE,
            f"model {config.model!r}: its generation_config.json asks for {asked}; this backend decodes one sequence "
            "per question (greedy or sampled), which the option-letter probe, the scene stop and streaming read row "
            "by row: set it to 1 there",
        )
    return model.eval(), processor


def _model_source(model: str) -> str:
    """What from_pretrained loads: the directory `model` names, or the hub id itself."""
    try:
        folder = local_checkpoint(model)
    except ValueError as exc:
        raise BackendError(BackendErrorKind.UNAVAILABLE, str(exc)) from exc
    return str(folder) if folder is not None else model


def _quantization_config(name: str, device: torch.device, dtype: torch.dtype) -> Any:
    if name == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise BackendError(
            BackendErrorKind.UNAVAILABLE, f"quantization {name!r} needs the bitsandbytes package (pip install bitsandbytes)"
        )
    if device.type != "cuda":
        raise BackendError(BackendErrorKind.UNAVAILABLE, f"quantization {name!r} needs a CUDA device, not {device}")
    from transformers import BitsAndBytesConfig

    if name == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def image_size_kwargs(image_processor: Any, config: TransformersConfig) -> dict[str, Any]:
    """Pixel limits as a per-call `size`, the one form transformers 4.5x and 5.x both honour.

    (5.x ignores a `size` given to from_pretrained when the checkpoint's preprocessor_config names min/max_pixels.)
    """
    if config.min_pixels is None and config.max_pixels is None:
        return {}
    loaded = image_processor.size
    return {
        "size": {
            "shortest_edge": config.min_pixels or loaded["shortest_edge"],
            "longest_edge": config.max_pixels or loaded["longest_edge"],
        }
    }


def vision_tower(model: Any) -> torch.nn.Module:
    """Qwen2.5-VL's vision tower: model.model.visual since transformers 4.52, model.visual before."""
    inner = getattr(model, "model", None)
    tower = getattr(inner, "visual", None) if inner is not None else None
    return tower if tower is not None else model.visual


def describe(exc: BaseException) -> str:
    """An exception as the short text a BackendError carries."""
    return excerpt(exc, 400) or type(exc).__name__
