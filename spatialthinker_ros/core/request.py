"""Every rule on what a caller may ask, and the one error type that refuses a request.

The ROS node and `spatialthinker-ask` both apply these rules, so the same bad request gets the same error code
and message from either. Each rule is here once: the question and its options, a caller's request id, the request
image (layout, pixels, aspect, frame_id), the size the model is given, depth/colour registration, image age, and the
one retry after the backend ran out of memory. `ErrorCode` is mapped to the AskSpatial.srv constants in the ROS layer
only (ros/conversions.py); the command line prints its value.
"""

from __future__ import annotations

import enum
import math
import re
from typing import Container, Mapping, Optional, Sequence

import numpy as np

from spatialthinker_ros.core.prompt import PromptConfig, Question, inline_options, option_letter, option_text
from spatialthinker_ros.core.text import excerpt
from spatialthinker_ros.core.types import BackendError, BackendErrorKind, InferenceResult

MAX_ASPECT_RATIO = 200          # Qwen2.5-VL's image processor refuses longer images, failing the whole batch
MAX_INTERNAL_ERROR_CHARS = 400   # of an unexpected exception's text in a reply
MAX_FRAME_ID_CHARS = 256        # a request image's frame_id is copied into every output message
MAX_REQUEST_IMAGE_PIXELS = 4096 * 4096   # default cap on request and camera images (node: max_request_image_pixels)
ASPECT_TOLERANCE = 0.02         # depth and colour must show the same field of view to be paired
DEPTH_SYNC_TOLERANCE_S = 0.05   # ...and stamps this close (default; node: depth_sync_tolerance)
OOM_RETRY_SCALE = 0.5           # per side, for the one retry after the backend ran out of memory
OOM_RETRY_MIN_PIXELS = 200_000  # smaller images are not retried: halving them would not help
PATCH = 28                      # Qwen2.5-VL's resize factor: 14-pixel patches merged 2x2
QWEN_MIN_PIXELS = 56 * 56       # Qwen2.5-VL's image processor's own min_pixels
REQUEST_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")   # a caller's request_id (srv/AskSpatial.srv)


class ErrorCode(enum.Enum):
    """Why a request got no answer. Values are what the command line prints; the node sends AskSpatial codes."""

    INVALID_REQUEST = "invalid_request"   # the request itself is malformed or over a limit
    NO_IMAGE = "no_image"                 # no camera frame yet, or the latest could not be decoded
    STALE_IMAGE = "stale_image"           # the newest frame is older than the allowed age
    UNKNOWN_CAMERA = "unknown_camera"
    BUSY = "busy"                         # the queue is full: retry later
    BACKEND = "backend"                   # the model could not answer (server down, out of memory, no replay match)
    TIMEOUT = "timeout"
    NOT_ACTIVE = "not_active"             # the node is not (or no longer) active
    CANCELLED = "cancelled"


class RequestError(Exception):
    """A request that ends with an error code instead of an answer. The message is safe to show the caller and
    bounded in length whatever the caller sent."""

    code: ErrorCode = ErrorCode.BACKEND

    def __init__(self, message: str, code: Optional[ErrorCode] = None):
        super().__init__(message)
        if code is not None:
            self.code = code


def internal_error(exc: BaseException) -> RequestError:
    """A bug's exception as the caller's reply: its type and an excerpt of its text, which may quote a whole
    input (replies stay bounded)."""
    return RequestError(f"internal error: {type(exc).__name__}: {excerpt(exc, MAX_INTERNAL_ERROR_CHARS)}",
                        ErrorCode.BACKEND)


class InvalidRequest(RequestError, ValueError):
    """The caller's request cannot be answered as asked (empty question, too many options, bad image ...)."""

    code = ErrorCode.INVALID_REQUEST


class ImageError(ValueError):
    """An image whose layout or content cannot be used; the message says exactly why. A request image that fails
    is an invalid request; a camera frame that fails is dropped."""


def check_request_id(request_id: str, in_progress: Container[str]) -> str:
    """A caller's request_id, which the answer carries and ~/cancel names: short and printable (it is logged), and
    not that of a request still in progress (a cancel must name one request)."""
    if not REQUEST_ID.fullmatch(request_id):
        raise InvalidRequest(f"request_id {excerpt(request_id, 80)!r} is not 1 to 64 characters of A-Z a-z 0-9 _ . : -")
    if request_id in in_progress:
        raise InvalidRequest(f"request_id {request_id!r} is that of a request still in progress")
    return request_id


def check_question(question: str, options: Sequence[str], config: PromptConfig = PromptConfig()) -> Question:
    """The checked question. Lengths are counted before whitespace is trimmed: answers and logs echo the text as
    it was sent, and a caller must not make the node hold megabytes of padding."""
    if isinstance(options, str):
        raise InvalidRequest("options must be a list of strings, not one string")
    if len(options) > config.max_options:
        raise InvalidRequest(f"{len(options)} options given; at most {config.max_options} are allowed")
    text = question.strip()
    if len(question) > config.max_question_chars:
        padded = " (with its whitespace)" if len(text) <= config.max_question_chars else ""
        raise InvalidRequest(f"the question is {len(question)} characters long{padded}; "
                             f"at most {config.max_question_chars} are allowed")
    if not text:
        raise InvalidRequest("the question is empty")
    checked = []
    for i, option in enumerate(options):
        if len(option) > config.max_option_chars:
            padded = " (with its whitespace)" if len(option.strip()) <= config.max_option_chars else ""
            raise InvalidRequest(f"option {option_letter(i)} is {len(option)} characters long{padded}; "
                                 f"at most {config.max_option_chars} are allowed")
        # One line per option keeps the inline "(A) ... (B) ..." list intact.
        option = " ".join(option_text(i, option).split())
        if not option:
            raise InvalidRequest(f"option {option_letter(i)} is empty")
        checked.append(option)
    written = inline_options(text)
    if checked and written:
        # Offered once: the question as written. Different lists would leave "(B)" ambiguous.
        if [" ".join(o.lower().split()) for o in written] != [o.lower() for o in checked]:
            raise InvalidRequest("the question carries its own options ("
                                 + " ".join(f"({option_letter(i)}) {o}" for i, o in enumerate(written))
                                 + ") and they differ from the options list; give them once")
        return Question(text, ())
    return Question(text, tuple(checked))


# ------------------------------------------------------------------------------------------------ images
def check_raw_layout(width: int, height: int, step: int, data_length: int, encoding: str,
                       layouts: Mapping[str, tuple[int, np.dtype]], max_pixels: int) -> tuple[int, np.dtype]:
    """O(1) checks of a raw image's fields that make a zero-copy view of its data safe.

    `layouts` maps each supported (lower-case) encoding to (channels, dtype). Returns the encoding's layout.
    """
    layout = layouts.get(encoding.lower())
    if layout is None:
        raise ImageError(f"unsupported encoding {excerpt(encoding)!r} (supported: {', '.join(sorted(layouts))})")
    channels, dtype = layout
    check_image_pixels(width, height, max_pixels)
    row_bytes = width * channels * np.dtype(dtype).itemsize
    if step < row_bytes:
        raise ImageError(f"step {step} is smaller than width x pixel size ({row_bytes} bytes)")
    if data_length != step * height:   # more is as wrong as less: e.g. rgb8 data sent as mono8
        raise ImageError(f"data holds {data_length} bytes, step x height is {step * height}")
    return channels, np.dtype(dtype)


def check_image_pixels(width: int, height: int, max_pixels: int) -> None:
    """Refuses an empty image, or one over `max_pixels` (max_request_image_pixels)."""
    if width == 0 or height == 0:
        raise ImageError(f"image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(f"image of {width}x{height} exceeds the {max_pixels}-pixel limit")


def request_image_error(error: ImageError) -> InvalidRequest:
    """What the caller is told about an image it sent that cannot be used."""
    return InvalidRequest(f"request image: {error}")


def check_frame_id(frame_id: str) -> None:
    if len(frame_id) > MAX_FRAME_ID_CHARS:
        raise InvalidRequest(f"request image frame_id is {len(frame_id)} characters long; "
                             f"at most {MAX_FRAME_ID_CHARS} are allowed")


def check_rgb(image: np.ndarray) -> None:
    """The array the core works on: RGB uint8 H x W x 3, not empty."""
    if not isinstance(image, np.ndarray):
        raise InvalidRequest(f"the image must be a numpy array, not {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InvalidRequest(f"the image must be RGB uint8 H x W x 3, not {image.dtype} of shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InvalidRequest(f"the image is empty (shape {image.shape})")


def check_aspect(size: tuple[int, int]) -> None:
    """The model's image processor refuses images longer than MAX_ASPECT_RATIO:1."""
    width, height = size
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise InvalidRequest(f"image of {width}x{height} pixels is longer than {MAX_ASPECT_RATIO}:1, "
                             "which the model cannot take")


def depth_aspect_mismatch(colour_size: tuple[int, int], depth_size: tuple[int, int]) -> Optional[str]:
    """Why a depth image cannot be registered to the colour image (another field of view), or None when it can.
    Depth of any resolution is fine: boxes are scaled to it."""
    (width, height), (depth_width, depth_height) = colour_size, depth_size
    colour_aspect = width / height
    if abs(colour_aspect - depth_width / depth_height) <= ASPECT_TOLERANCE * colour_aspect:
        return None
    return f"depth {depth_width}x{depth_height} does not have the aspect of the colour image {width}x{height}"


# ------------------------------------------------------------------------------------------------ model size
def model_image_size(size: tuple[int, int], max_input_pixels: int,
                     processor_max_pixels: Optional[int] = None) -> tuple[int, int]:
    """(width, height) of the image handed to the backend, whose size the prompt states.

    First `size` is scaled down, aspect kept, to `max_input_pixels` (a plain area cap). With
    `processor_max_pixels` (backends whose image processor is not ours: an OpenAI-compatible server), a frame
    that Qwen2.5-VL's processor would shrink is then shrunk here to exactly the size the processor would give it
    (`smart_resize`): the server, whatever its own max_pixels, then sees the image tokens the in-process backend
    would, and the prompt states the size it was sent.
    """
    width, height = size
    if width * height > max_input_pixels:
        scale = math.sqrt(max_input_pixels / (width * height))
        new_width, new_height = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
        # A side held at 1 pixel must not push the other over the cap (extreme aspect ratios).
        width = min(new_width, max_input_pixels // new_height)
        height = min(new_height, max_input_pixels // width)
    if processor_max_pixels is not None and _round(width) * _round(height) > processor_max_pixels:
        height, width = smart_resize(height, width, processor_max_pixels)
    return width, height


def smart_resize(height: int, width: int, max_pixels: int, min_pixels: int = QWEN_MIN_PIXELS) -> tuple[int, int]:
    """Qwen2.5-VL's image processor resize: each side a multiple of 28, the area within [min, max]_pixels, aspect
    kept. Written out (15 lines) so the openai path needs neither torch nor transformers; a test checks it
    against transformers' own."""
    check_aspect((width, height))
    h_bar, w_bar = _round(height), _round(width)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(PATCH, math.floor(height / beta / PATCH) * PATCH)
        w_bar = max(PATCH, math.floor(width / beta / PATCH) * PATCH)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / PATCH) * PATCH, math.ceil(width * beta / PATCH) * PATCH
    return h_bar, w_bar


def _round(side: int) -> int:
    return max(PATCH, round(side / PATCH) * PATCH)


# ------------------------------------------------------------------------------------------------ frames
def max_image_age(requested: float, default: float) -> float:
    """The age limit of a request: its own (seconds, > 0), else the node's default; 0 means no limit."""
    if not math.isfinite(requested) or requested < 0:
        raise InvalidRequest(f"max_image_age must be >= 0, not {requested}")
    return requested or default


def check_image_age(age: float, limit: float, camera: str) -> None:
    if limit > 0 and age > limit:
        raise RequestError(f"latest frame of camera {camera!r} is {age:.2f} s old (limit {limit:.2f} s)",
                           ErrorCode.STALE_IMAGE)


# ------------------------------------------------------------------------------------------------ backend
def oom_retry_pixels(size: tuple[int, int]) -> Optional[int]:
    """After the backend ran out of memory on an image of `size`: the pixel cap of the one retry (half each side),
    or None when the image is too small for a smaller one to help."""
    width, height = size
    if width * height < OOM_RETRY_MIN_PIXELS:
        return None
    return max(PATCH, int(width * OOM_RETRY_SCALE)) * max(PATCH, int(height * OOM_RETRY_SCALE))


def is_out_of_memory(outcome: InferenceResult | BackendError) -> bool:
    return isinstance(outcome, BackendError) and outcome.kind is BackendErrorKind.OUT_OF_MEMORY


def answered(outcome: InferenceResult | BackendError, backend: str) -> InferenceResult:
    """The backend's answer, or the RequestError (ErrorCode.BACKEND) its failure becomes."""
    if isinstance(outcome, BackendError):
        raise RequestError(f"backend {backend} ({outcome.kind.value}): {outcome}", ErrorCode.BACKEND)
    return outcome
