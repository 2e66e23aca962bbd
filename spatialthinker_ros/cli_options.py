"""What the commands share (spatialthinker-ask, spatialthinker-eval, spatialthinker_camera): exit codes, the
usage error, the prompt, model and depth options built from the node's parameters, and their reading back into
backend and pipeline settings."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

from spatialthinker_ros.core.backends import create_backend
from spatialthinker_ros.core.backends.base import Backend
from spatialthinker_ros.core.backends.openai_backend import OpenAIConfig
from spatialthinker_ros.core.backends.settings import DEFAULT_MODEL, TransformersConfig, applies_to
from spatialthinker_ros.core.config import BY_NAME as PARAMETERS_BY_NAME, pipeline_config_from
from spatialthinker_ros.core.pipeline import PipelineConfig
from spatialthinker_ros.core.validation import validate_model_reference

EXIT_OK, EXIT_USAGE, EXIT_BACKEND, EXIT_INTERRUPTED = 0, 2, 3, 130
_BACKEND_ONLY = ("model", "device", "server_url", "replay_file", "max_pixels")   # options some backends ignore
# How the in-process model loads, as the node's parameters of these names (refused elsewhere when not the default)
_TRANSFORMERS_MODEL_OPTIONS = ("dtype", "quantization", "attn_implementation", "min_pixels")


class UsageError(Exception):
    """Bad command line or input file: exit 2 with this message."""


def add_model_arguments(parser: argparse.ArgumentParser, prompt_group: Any, timeout_help: Optional[str] = None) -> None:
    """The prompt and backend options, shared with spatialthinker-eval (read back by setting_values and
    pipeline_config). `prompt_group`: an argument group of `parser` (argparse keeps its class private);
    `timeout_help`: what --timeout means for that command, when not spatialthinker-ask's."""
    setting_option(prompt_group, "prompt_style")
    setting_option(prompt_group, "max_input_pixels", "the prompt states that size and boxes are mapped back to the "
                   "image's pixels")
    setting_option(prompt_group, "max_question_chars")
    setting_option(prompt_group, "max_request_image_pixels")

    model = parser.add_argument_group("model")
    setting_option(model, "backend", "replay answers from --replay-file")
    model.add_argument("--model", metavar="M",
                       help=f"transformers: hub id or checkpoint directory; openai: the name the server serves "
                            f"the model under (default {DEFAULT_MODEL})")
    model.add_argument("--device", metavar="D",
                       help="transformers: auto (default; cuda when available), cpu, cuda or cuda:N")
    model.add_argument("--server-url", metavar="URL",
                       help=f"openai: base URL of the server (default {OpenAIConfig().server_url}); the API key, if "
                            f"any, goes in ${OpenAIConfig().api_key_env}, never in the URL")
    model.add_argument("--replay-file", type=Path, metavar="F",
                       help='replay: JSON Lines of {"question": ..., "response": ...}; the question must match exactly')
    setting_option(model, "max_new_tokens", "as the authors' evaluation")
    setting_option(model, "min_pixels", "transformers: the image processor's, as the node sends it")
    setting_option(model, "dtype", "transformers")
    setting_option(model, "quantization", "transformers, on cuda")
    setting_option(model, "attn_implementation", "transformers")
    model.add_argument("--max-pixels", type=int, metavar="N",
                       help="the image processor's max_pixels (image tokens = pixels / 784): transformers applies "
                            "it in-process; openai sends larger frames downscaled to it, and the prompt states "
                            f"the size sent (default {TransformersConfig().max_pixels}; node parameter max_pixels)")
    model.add_argument("--timeout", type=float, metavar="S",
                       help=timeout_help or "give up when no answer arrives within S seconds once the model is loaded "
                            f"(default: no limit; openai: {OpenAIConfig().timeout_s:g} s per request)")


def setting_option(group: Any, name: str, more: str = "") -> None:
    """The option --NAME for the node parameter NAME: its type, default, choices and description (core/config.py),
    plus what the option adds (`more`). `group`: an argparse parser or argument group."""
    spec = PARAMETERS_BY_NAME[name]
    text = "; ".join(part for part in (spec.description, more) if part)
    group.add_argument(f"--{name.replace('_', '-')}", type=spec.type, default=spec.default,
                       choices=spec.choices or None, metavar=None if spec.choices else name.split("_")[-1].upper(),
                       help=f"{text} (default {spec.default}; node parameter {name})".replace("%", "%%"))


def add_depth_arguments(parser: argparse.ArgumentParser, title: str) -> Any:
    """--depth, --depth-scale and the intrinsics, read back by read_depth_and_intrinsics (shared with
    spatialthinker_camera)."""
    depth = parser.add_argument_group(title)
    depth.add_argument("--depth", type=Path, metavar="FILE",
                       help="depth image registered to --image (same viewpoint and field of view, any resolution): "
                            "16-bit PNG/TIFF (units of --depth-scale), or .npy (float: metres, integer: units of "
                            "--depth-scale); needs --fx --fy --cx --cy")
    setting_option(depth, "depth_scale", "of 16-bit files and integer .npy arrays")
    for name, what in (("fx", "focal length x"), ("fy", "focal length y"), ("cx", "principal point x"),
                       ("cy", "principal point y")):
        depth.add_argument(f"--{name}", type=float, metavar="PX", help=f"{what}, in pixels of --image")
    return depth


def pipeline_config(args: argparse.Namespace, **fields: Any) -> PipelineConfig:
    """The pipeline settings of add_model_arguments' prompt options, plus any other PipelineConfig `fields`."""
    try:
        return pipeline_config_from(vars(args), **fields)
    except ValueError as exc:
        raise UsageError(exc) from None


def setting_values(args: argparse.Namespace) -> dict[str, Any]:
    """The options that set a backend, named as the node's parameters; an option the backend ignores is refused."""
    for option in _BACKEND_ONLY:
        backends = applies_to(option)
        if getattr(args, option) is not None and args.backend not in backends:
            raise UsageError(f"--{option.replace('_', '-')} only applies to --backend {' or '.join(backends)}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UsageError(f"--timeout must be a positive number of seconds, not {args.timeout}")
    if args.backend == "replay":
        if args.replay_file is None:
            raise UsageError("--backend replay needs --replay-file")
        return dict(replay_file=str(args.replay_file))
    for option in _TRANSFORMERS_MODEL_OPTIONS:
        if getattr(args, option) != PARAMETERS_BY_NAME[option].default and args.backend not in applies_to(option):
            raise UsageError(f"--{option.replace('_', '-')} only applies to --backend {' or '.join(applies_to(option))}")
    try:
        model = validate_model_reference(args.model or DEFAULT_MODEL)
    except ValueError as exc:
        raise UsageError(exc) from None
    if args.backend == "transformers" and model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():
        raise UsageError(f"--model {model}: no such checkpoint directory")
    return dict(model=model, device=args.device, server_url=args.server_url, max_new_tokens=args.max_new_tokens,
                server_timeout=args.timeout, max_pixels=args.max_pixels,
                **{option: getattr(args, option) for option in _TRANSFORMERS_MODEL_OPTIONS})


def load_backend(name: str, settings: dict[str, Any]) -> Backend:
    """The backend, or a UsageError for settings it refuses (a BackendError, e.g. no such model, passes)."""
    try:
        return create_backend(name, **settings)
    except ValueError as exc:          # config validation, a missing or malformed replay file
        raise UsageError(exc) from None
    except OSError as exc:
        raise UsageError(f"cannot load the {name} backend: {exc}") from None


def quiet_libraries(verbose: bool, prog: str) -> None:
    """Without -v, stderr carries only our one-line errors: no progress bars or advisory warnings. Log lines
    start with `prog`, the command that printed them."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format=f"{prog}: %(levelname)s: %(name)s: %(message)s")
    # huggingface_hub prints its records (download retries, ...) through the stderr handler it adds on import AND
    # passes them on to ours: each line came twice, once without the prefix. Ours alone prints them. (It comes with
    # the transformers extra; the pip route without it has no hub and no such handler.)
    if importlib.util.find_spec("huggingface_hub") is not None:
        import huggingface_hub.utils.logging  # noqa: F401 - adds that handler now, so it can be removed

        hub = logging.getLogger("huggingface_hub")
        for handler in list(hub.handlers):
            hub.removeHandler(handler)
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

