"""spatialthinker-ask: one spatial question about one image file, answered as JSON on stdout, without ROS.

It runs the node's own ask flow (core/ask.py: prepare -> backend -> one retry after out of memory -> finish)
under the node's own request rules (core/request.py: the same bad request gets the same error code and message),
so what it prints is what the node would answer for the same frame: try a model, a server, a prompt style or a depth setup here first. Options
that set one of the node's parameters have its name (--max-pixels is max_pixels, ...) and its default.

Exit codes: 0 answered (whatever the answer's status), 2 bad usage or input, 3 the backend failed,
130 interrupted. Expected errors print one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import cv2
import numpy as np

from spatialthinker_ros.core.backends import create_backend
from spatialthinker_ros.core.backends.base import Backend
from spatialthinker_ros.core.backends.openai_backend import OpenAIConfig
from spatialthinker_ros.core.backends.settings import DEFAULT_MODEL, TransformersConfig, applies_to, backend_settings
from spatialthinker_ros.core.conformal import Calibration, CalibrationError
from spatialthinker_ros.core.config import BY_NAME as PARAMETERS_BY_NAME, configured_calibration, pipeline_config_from
from spatialthinker_ros.core.geometry import CameraIntrinsics, DepthImage
from spatialthinker_ros.core.images import decode_quietly, decode_rgb
from spatialthinker_ros.core.ask import AskFlow
from spatialthinker_ros.core.pipeline import PipelineConfig, answer_dict, check_image
from spatialthinker_ros.core.relations import RelationCheckConfig
from spatialthinker_ros.core.request import (ErrorCode, ImageError, RequestError, check_question, depth_aspect_mismatch,
                                             request_image_error)
from spatialthinker_ros.core.sources import Source
from spatialthinker_ros.core.types import BackendError, InferenceRequest, InferenceResult, SpatialResult
from spatialthinker_ros.core.validation import validate_model_reference

PROG = "spatialthinker-ask"
DATA_DIR = Path(__file__).resolve().parent / "data"   # the bundled sample scene
EXIT_OK, EXIT_USAGE, EXIT_BACKEND, EXIT_INTERRUPTED = 0, 2, 3, 130
_FLAT = re.compile(r"([\[{])\n\s+([^\[\]{}]*?)\n\s*([\]}])")   # a list or object holding no other
_BACKEND_ONLY = ("model", "device", "server_url", "replay_file", "max_pixels")   # options some backends ignore


class UsageError(Exception):
    """Bad command line or input file: exit 2 with this message."""


EPILOG = """\
examples:
  # the real model on a GPU (downloads ~15 GB from the hub on first use)
  spatialthinker-ask --image kitchen.jpg --question "Where is the mug relative to the laptop?" \\
      --options "left of" "right of" "in front of" "behind" --device cuda

  # one GPU server (vLLM, SGLang, transformers serve) answering many robots; key in $SPATIALTHINKER_API_KEY
  spatialthinker-ask --backend openai --server-url http://gpu-box:8000/v1 --image kitchen.jpg --question "..."

  # no GPU: the bundled sample scene and its recorded answer, with 3D from its depth image
  spatialthinker-ask --backend replay --replay-file $DATA/sample_replay.jsonl --image $DATA/sample_scene.png \\
      --question "Where is the mug relative to the plate?" --options "left of" "right of" "behind" "in front of" \\
      --depth $DATA/sample_scene_depth.png --fx 525 --fy 525 --cx 319.5 --cy 239.5 --annotate out.png
  (first DATA=$(spatialthinker-ask --data-dir): the installed package's data folder)

exit codes: 0 answered (see "status" in the JSON), 2 bad usage or input file, 3 backend error, 130 interrupted
"""


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Ask SpatialThinker one spatial question about an image. Prints the answer, scene graph "
                    "(boxes in the image's pixels, 3D positions when depth is given) and timings as JSON.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ask = parser.add_argument_group("question")
    ask.add_argument("--image", required=True, type=Path, metavar="FILE",
                     help="colour image (PNG, JPEG, BMP, TIFF, WebP, ... anything OpenCV reads)")
    ask.add_argument("--question", required=True, help='the question, e.g. "Is the mug left of the plate?"')
    ask.add_argument("--options", nargs="+", default=[], metavar="OPTION",
                     help="multiple-choice options; the prompt labels them (A), (B), ... and the JSON's "
                          '"choice" is the letter the answer names')
    ask.add_argument("--scene-only", action="store_true",
                     help="stop once the scene graph is complete (no reasoning or answer): faster")
    add_model_arguments(parser, ask)

    depth = add_depth_arguments(parser, "3D positions (optional)")
    depth.add_argument("--check-relations", action=argparse.BooleanOptionalAction, default=True,
                       help="with depth, check each relation of the scene graph against the 3D positions: "
                            "consistent, contradicted, uncertain (within the margin) or not checked, with the "
                            "measured quantities (default: on)")
    setting_option(depth, "relation_margin")

    out = parser.add_argument_group("output")
    out.add_argument("--annotate", type=Path, metavar="OUT.png",
                     help="also save the image with boxes, ids, depths and relations drawn on it")
    out.add_argument("--calibration", type=Path, metavar="FILE",
                     help="a spatialthinker-eval calibrate file: print the answer's prediction set over the options "
                          "(refused when it was calibrated with other settings)")
    out.add_argument("-v", "--verbose", action="store_true", help="log model loading and library warnings")
    out.add_argument("--data-dir", action=_PrintDataDir,
                     help="print the folder of the bundled sample scene (image, depth, replay file) and exit")
    return parser


class _PrintDataDir(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, help: Optional[str] = None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(DATA_DIR)
        parser.exit()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:        # argparse has printed usage and the error (or the help)
        return int(exit_.code or 0)
    quiet_libraries(args.verbose)
    try:
        print(to_json(run(args)))
        return EXIT_OK
    except UsageError as exc:
        return _fail(f"error: {exc}", EXIT_USAGE)
    except RequestError as exc:        # the node answers these with the same code and message
        return _fail(f"error ({exc.code.value}): {exc}",
                     EXIT_USAGE if exc.code is ErrorCode.INVALID_REQUEST else EXIT_BACKEND)
    except BackendError as exc:        # loading failed: no CUDA, a hub model neither cached nor downloadable, ...
        return _fail(f"backend error ({exc.kind.value}): {exc}", EXIT_BACKEND)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Validate everything cheap first, so a typo fails in milliseconds rather than after loading 15 GB."""
    started = time.perf_counter()
    settings = backend_settings(args.backend, setting_values(args))
    try:
        relations = RelationCheckConfig(enabled=args.check_relations, margin_m=args.relation_margin)
    except ValueError as exc:
        raise UsageError(exc) from None
    config = pipeline_config(args, relations=relations, calibration=read_calibration(args))
    asked = check_question(args.question, args.options, config.prompt)
    rgb = read_image(args.image, config.max_request_image_pixels)
    check_image(rgb, config)
    height, width = rgb.shape[:2]
    depth, intrinsics = read_depth_and_intrinsics(args, (width, height), config.max_request_image_pixels)
    if args.annotate is not None:
        check_writable_image(args.annotate)

    loading = time.perf_counter()
    backend = load_backend(args.backend, settings)
    load_seconds = time.perf_counter() - loading
    retrying = lambda smaller: logging.getLogger(PROG).warning("out of memory: retrying with a smaller image")
    try:
        flow = AskFlow(Source(rgb, depth=depth, intrinsics=intrinsics), args.question, args.options,
                       config.for_backend(backend), scene_only=args.scene_only, asked=asked, on_retry=retrying)
        while flow.pending:
            flow.record(generate(backend, flow.request, args.timeout))
    except _Abandoned:
        raise                          # the overrunning generation still uses the model: process exit frees it
    except BaseException:
        backend.close()
        raise
    backend.close()
    result = flow.finish(backend.name)
    if args.annotate is not None:
        write_annotated(args.annotate, rgb, result)
    return answer_dict(result.parsed, result.inference, args.question, args.options) | {
        "model_image_size": list(result.model_image_size),
        "backend": backend.name,
        "load_seconds": round(load_seconds, 3),
        "total_seconds": round(time.perf_counter() - started, 3),
        "annotated": str(args.annotate) if args.annotate is not None else None,
        "prediction_set": list(result.prediction_set),
        "prediction_set_coverage": result.prediction_set_coverage,
    }


def read_calibration(args: argparse.Namespace) -> Optional[Calibration]:
    """--calibration, checked against the settings that will answer (None without one)."""
    if args.calibration is None:
        return None
    try:
        return configured_calibration(str(args.calibration), vars(args) | {"model": args.model or DEFAULT_MODEL})
    except CalibrationError as exc:
        raise UsageError(exc) from None


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
    if args.min_pixels != PARAMETERS_BY_NAME["min_pixels"].default and args.backend not in applies_to("min_pixels"):
        raise UsageError(f"--min-pixels only applies to --backend {' or '.join(applies_to('min_pixels'))}")
    try:
        model = validate_model_reference(args.model or DEFAULT_MODEL)
    except ValueError as exc:
        raise UsageError(exc) from None
    if args.backend == "transformers" and model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():
        raise UsageError(f"--model {model}: no such checkpoint directory")
    return dict(model=model, device=args.device, server_url=args.server_url, max_new_tokens=args.max_new_tokens,
                server_timeout=args.timeout, max_pixels=args.max_pixels, min_pixels=args.min_pixels)


def load_backend(name: str, settings: dict[str, Any]) -> Backend:
    """The backend, or a UsageError for settings it refuses (a BackendError, e.g. no such model, passes)."""
    try:
        return create_backend(name, **settings)
    except ValueError as exc:          # config validation, a missing or malformed replay file
        raise UsageError(exc) from None
    except OSError as exc:
        raise UsageError(f"cannot load the {name} backend: {exc}") from None


class _Abandoned(RequestError):
    """The timeout passed while the backend was still generating on its thread."""

    code = ErrorCode.TIMEOUT


def generate(backend: Backend, request: InferenceRequest, timeout: Optional[float]) -> InferenceResult | BackendError:
    """One outcome; with a timeout the generation runs on a daemon thread that is abandoned if it overruns."""
    outcome: list[Any] = []

    def work() -> None:
        try:
            outcome.extend(backend.generate([request]))
        except BaseException as exc:   # a backend bug: re-raised on the caller's thread below
            outcome.append(exc)

    if timeout is None:
        work()
    else:
        worker = threading.Thread(target=work, name="spatialthinker-ask-generate", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            raise _Abandoned(f"no answer within {timeout:g} s")
    [answer] = outcome
    if isinstance(answer, BaseException) and not isinstance(answer, BackendError):
        raise answer
    return answer


# ------------------------------------------------------------------------------------------------ input files
def _read_bytes(path: Path, what: str) -> bytes:
    if not path.exists():
        raise UsageError(f"{what} file {path} does not exist")
    if not path.is_file():
        raise UsageError(f"{what} file {path} is not a regular file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    if not data:
        raise UsageError(f"{what} file {path} is empty")
    return data


def read_image(path: Path, max_pixels: int) -> np.ndarray:
    """RGB uint8 HxWx3 (OpenCV reads BGR; grey and 16-bit images are converted). A file whose header declares
    over `max_pixels` is refused before it is decoded."""
    try:
        rgb = decode_rgb(_read_bytes(path, "image"), max_pixels)
    except ImageError as exc:   # refused as the node refuses a request image of that size
        raise request_image_error(exc) from None
    if rgb is None:
        raise UsageError(f"cannot decode image file {path}: corrupt, or not a format OpenCV reads "
                         "(PNG, JPEG, BMP, TIFF, WebP, ...)")
    return rgb


def read_depth(path: Path, depth_scale: float, max_pixels: int) -> DepthImage:
    """The depth of a 16-bit image (units of depth_scale metres) or a .npy array (float: metres)."""
    if path.suffix.lower() == ".npy":
        _read_bytes(path, "depth")
        try:   # mapped, not read: its shape is checked before any of it is loaded
            depth = np.load(path, allow_pickle=False, mmap_mode="r")
        except (ValueError, OSError, EOFError) as exc:
            raise UsageError(f"cannot load depth file {path} as a numpy array: {exc}") from None
        if depth.ndim >= 2 and depth.shape[0] * depth.shape[1] > max_pixels:
            raise UsageError(f"depth file {path}: array of {depth.shape[1]}x{depth.shape[0]} exceeds the "
                             f"{max_pixels}-pixel limit")
        depth = np.asarray(depth)
    else:
        try:
            depth = decode_quietly(_read_bytes(path, "depth"), cv2.IMREAD_UNCHANGED, max_pixels=max_pixels)
        except ImageError as exc:
            raise UsageError(f"depth file {path}: {exc}") from None
        if depth is None:
            raise UsageError(f"cannot decode depth file {path}: corrupt, or not a 16-bit PNG/TIFF or .npy")
    if depth.ndim == 3 and depth.shape[2] == 1:
        depth = depth[:, :, 0]
    if depth.ndim != 2 or depth.size == 0:
        raise UsageError(f"depth file {path} must hold one channel (H x W), not shape {depth.shape}")
    if np.issubdtype(depth.dtype, np.floating):
        encoding = "32FC1"                                   # metres, as ROS 32FC1
    elif depth.dtype == np.uint8:
        raise UsageError(f"depth file {path} is 8-bit, which cannot hold depth: use a 16-bit PNG (millimetres "
                         "by default) or a float .npy in metres")
    elif np.issubdtype(depth.dtype, np.integer):
        encoding = "16UC1"                                   # units of depth_scale
    else:
        raise UsageError(f"depth file {path} has unsupported type {depth.dtype}")
    try:
        return DepthImage.from_sensor(depth, encoding, depth_scale=depth_scale)
    except ValueError as exc:
        raise UsageError(f"--depth-scale: {exc}") from None


def read_depth_and_intrinsics(
    args: argparse.Namespace, image_size: tuple[int, int], max_pixels: int
) -> tuple[Optional[DepthImage], Optional[CameraIntrinsics]]:
    given = {name: getattr(args, name) for name in ("fx", "fy", "cx", "cy") if getattr(args, name) is not None}
    if args.depth is None:
        if given:
            raise UsageError(f"--{', --'.join(given)} given without --depth; intrinsics are only used with depth")
        return None, None
    missing = [name for name in ("fx", "fy", "cx", "cy") if name not in given]
    if missing:
        raise UsageError(f"--depth needs the camera intrinsics: --{' --'.join(missing)} missing")
    depth = read_depth(args.depth, args.depth_scale, max_pixels)
    width, height = image_size
    mismatch = depth_aspect_mismatch(image_size, (depth.shape[1], depth.shape[0]))
    if mismatch:
        raise UsageError(f"{mismatch}: it must be registered to the colour image (same field of view)")
    try:
        intrinsics = CameraIntrinsics(fx=given["fx"], fy=given["fy"], cx=given["cx"], cy=given["cy"],
                                      width=width, height=height)
    except ValueError as exc:
        raise UsageError(exc) from None
    return depth, intrinsics


# ------------------------------------------------------------------------------------------------ outputs
def check_writable_image(path: Path) -> None:
    if not cv2.haveImageWriter(str(path)):
        raise UsageError(f"--annotate {path}: OpenCV cannot write images of type {path.suffix or '(none)'!r}; "
                         "use .png or .jpg")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"--annotate {path}: folder {folder} does not exist")


def write_annotated(path: Path, rgb: np.ndarray, result: SpatialResult) -> None:
    from spatialthinker_ros.core.annotate import draw_scene

    caption = result.parsed.answer or result.parsed.status.name.lower()
    canvas = draw_scene(rgb, result.scene, caption)
    try:
        written = cv2.imwrite(str(path), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    except cv2.error as exc:
        raise UsageError(f"cannot write annotated image {path}: {' '.join(str(exc).split())}") from None
    if not written:
        raise UsageError(f"cannot write annotated image {path}")


def to_json(result: dict[str, Any]) -> str:
    """Indented JSON with flat lists and objects on one line, so a box reads [x1, y1, x2, y2]."""
    text = json.dumps(result, indent=2, ensure_ascii=False)
    # JSON strings hold no raw newlines, so inside a flat list or object ",\n  " only separates items
    return _FLAT.sub(lambda m: m.group(1) + re.sub(r",\n\s+", ", ", m.group(2)) + m.group(3), text)


def quiet_libraries(verbose: bool, prog: str = PROG) -> None:
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


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
