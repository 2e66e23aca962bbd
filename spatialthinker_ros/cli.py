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
import json
import logging
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import cv2
import numpy as np

from spatialthinker_ros.cli_files import read_depth_and_intrinsics, read_image
from spatialthinker_ros.cli_options import (EXIT_BACKEND, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, UsageError,
                                            add_depth_arguments, add_model_arguments, load_backend, pipeline_config,
                                            quiet_libraries, setting_option, setting_values)
from spatialthinker_ros.core.ask import AskFlow
from spatialthinker_ros.core.backends.base import Backend
from spatialthinker_ros.core.backends.settings import DEFAULT_MODEL, backend_settings
from spatialthinker_ros.core.conformal import Calibration, CalibrationError, check_setup, read_calibration_file
from spatialthinker_ros.core.config import answering_setup, lift_config_from
from spatialthinker_ros.core.pipeline import answer_dict, check_image
from spatialthinker_ros.core.relations import RelationCheckConfig
from spatialthinker_ros.core.request import ErrorCode, RequestError, check_question
from spatialthinker_ros.core.sources import Source
from spatialthinker_ros.core.types import BackendError, InferenceRequest, InferenceResult, SpatialResult

PROG = "spatialthinker-ask"
DATA_DIR = Path(__file__).resolve().parent / "data"   # the bundled sample scene
_FLAT = re.compile(r"([\[{])\n\s+([^\[\]{}]*?)\n\s*([\]}])")   # a list or object holding no other


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
    checking = RelationCheckConfig().enabled
    depth.add_argument("--check-relations", action=argparse.BooleanOptionalAction, default=checking,
                       help="with depth, check each relation of the scene graph against the 3D positions: "
                            "consistent, contradicted, uncertain (within the margin) or not checked, with the "
                            f"measured quantities (default: {'on' if checking else 'off'}; node parameter "
                            "check_relations)")
    setting_option(depth, "relation_margin")
    setting_option(depth, "min_depth")
    setting_option(depth, "max_depth")

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
    quiet_libraries(args.verbose, PROG)
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
        lift = lift_config_from(vars(args))
    except ValueError as exc:
        raise UsageError(exc) from None
    calibration = read_calibration(args)
    config = pipeline_config(args, relations=relations, lift=lift, calibration=calibration)
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
    if calibration is not None:
        check_calibration(calibration, args, backend)
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
    """--calibration's file (None without one), read before the model loads: a bad file fails in milliseconds."""
    if args.calibration is None:
        return None
    try:
        return read_calibration_file(str(args.calibration))
    except CalibrationError as exc:
        raise UsageError(exc) from None


def check_calibration(calibration: Calibration, args: argparse.Namespace, backend: Backend) -> None:
    """UsageError, with the backend closed, when --calibration was made with another setup than the loaded one."""
    try:
        check_setup(calibration, str(args.calibration), answering_setup(backend, vars(args)))
    except (CalibrationError, ValueError, BackendError) as exc:
        backend.close()
        raise UsageError(exc) from None


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


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
