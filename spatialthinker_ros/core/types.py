"""Plain data passed between the stages of the ROS-free core.

Data flows one way: frame + question -> prompt (prompt.py) -> backend (backends/) -> raw text ->
ParsedResponse (parsing.py) -> boxes mapped to the camera and lifted to 3D (geometry.py) -> SpatialResult.
Every stage takes and returns these types, so the ROS layer only converts them to messages. The errors that
refuse a request (`RequestError` and its codes) are in request.py, with the rules that raise them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from spatialthinker_ros.core.prompt import Question, answer_options


@dataclass(frozen=True)
class Box:
    """Axis-aligned box, corner form, in pixels (x right, y down). Invariant after geometry: min <= max."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float

    @property
    def width(self) -> float:
        return self.x_max - self.x_min

    @property
    def height(self) -> float:
        return self.y_max - self.y_min


@dataclass(frozen=True)
class Position3D:
    """Centre and approximate extent of the object's depth surface in the camera optical frame (z forward, x right,
    y down), metres; how the surface was chosen is in geometry.lift_box."""

    x: float
    y: float
    z: float
    size_x: float
    size_y: float
    size_z: float
    depth_spread: float = 0.0    # half the 16th-84th percentile range of the surface's depths (~1 sigma); 0: none
    ambiguous: bool = False      # another depth surface in the box held a similar share: the choice was a guess


@dataclass(frozen=True)
class SceneObject:
    id: str                      # the model's id, e.g. "cup.1"
    label: str                   # the id without its ".N" suffix, underscores as spaces, e.g. "cup"
    box: Box                     # pixels of the image the box refers to (see SceneGraph.image_size)
    position: Optional[Position3D] = None


class RelationCheck(enum.IntEnum):
    """What the measured 3D positions say about a relation (core/relations.py). Same values as
    SceneRelation.CHECK_* in msg/SceneRelation.msg."""

    NOT_CHECKED = 0     # outside the checked vocabulary, no 3D position, or checks turned off; check_note says which
    CONSISTENT = 1      # the positions agree, by more than the margin
    CONTRADICTED = 2    # the positions disagree, by more than the margin
    UNCERTAIN = 3       # the difference is within the margin: the positions cannot tell


@dataclass(frozen=True)
class SceneRelation:
    subject: str
    predicate: str
    object: str
    check: RelationCheck = RelationCheck.NOT_CHECKED
    check_note: str = ""         # the measured quantities behind `check` (metres), or why it was not checked


@dataclass(frozen=True)
class SceneGraph:
    objects: tuple[SceneObject, ...] = ()
    relations: tuple[SceneRelation, ...] = ()
    image_size: tuple[int, int] = (0, 0)     # (width, height) in pixels of the image the boxes refer to


class AnswerStatus(enum.IntEnum):
    """Same values as SpatialAnswer.STATUS_* in msg/SpatialAnswer.msg."""

    COMPLETE = 0
    PARTIAL = 1
    NO_ANSWER = 2


@dataclass(frozen=True)
class ParsedResponse:
    """What could be recovered from one raw model output. Parsing never raises; problems say what was lost."""

    observation: str
    scene: SceneGraph
    scene_complete: bool         # a closed <scene> whose JSON parsed (possibly after repair)
    reasoning: str
    answer: str                  # text inside <answer>, trimmed; "" when none found
    choice: str                  # option letter ("A".."Z") when the answer names one of the options, else ""
    status: AnswerStatus
    problems: tuple[str, ...] = ()
    # The model's probability of each offered option, in option order, summing to 1 (InferenceResult's, checked
    # against the options by pipeline.finish_result); () for a free-form question or when the backend has none.
    option_probabilities: tuple[float, ...] = ()

    @property
    def status_message(self) -> str:
        return "; ".join(self.problems)


@dataclass
class InferenceRequest:
    """One question about one image, ready for a backend.

    `image` is RGB uint8 HxWx3 and is exactly what the model sees; `prompt` already states its size.
    """

    image: np.ndarray
    prompt: str
    question: str                # the caller's question as asked (the replay backend matches on it)
    scene_only: bool = False     # stop once "</scene>" has been generated
    on_text: Optional[Callable[[str, int], None]] = None   # (text so far, tokens so far); called from the backend's thread
    request_id: str = ""
    asked: Optional[Question] = None   # the checked question and options the prompt states (for a retry)

    @property
    def offered_options(self) -> tuple[str, ...]:
        """The options the answer chooses among, lettered A, B, ... in this order: those the prompt lists, else
        those the question carries inline (prompt.answer_options); () for a free-form question."""
        if self.asked is None:
            return tuple(answer_options(self.question, ()))
        return tuple(answer_options(self.asked.text, self.asked.options))


@dataclass(frozen=True)
class InferenceResult:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str = ""
    seconds: float = 0.0         # wall time the backend spent on this request (a batch's time for each member)
    # The model's probability of each of the request's offered_options, in that order, summing to 1: its next-token
    # distribution at the answer's option letter, renormalised over the offered letters. () when there are none;
    # then, for a question with options, option_probabilities_note says why. With probabilities, the note says how
    # a reading not made at the letter the model wrote was made ("read one step further, as if ..."), else "".
    option_probabilities: tuple[float, ...] = ()
    option_probabilities_note: str = ""


class BackendErrorKind(enum.Enum):
    UNAVAILABLE = "unavailable"      # server down / connection refused / model not loaded
    TIMEOUT = "timeout"
    OUT_OF_MEMORY = "out_of_memory"
    NO_MATCH = "no_match"            # replay: no recorded response for this question
    FAILED = "failed"                # anything else the backend raised


class BackendError(Exception):
    """A backend could not answer. The message is safe to show a caller (never contains secrets)."""

    def __init__(self, kind: BackendErrorKind, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class SpatialResult:
    """A finished answer: parsed response with boxes in the SOURCE camera image's pixels (and 3D if depth)."""

    parsed: ParsedResponse
    inference: InferenceResult
    prompt: str = ""
    model_image_size: tuple[int, int] = (0, 0)   # (width, height) of the image given to the model
    prediction_set: tuple[str, ...] = ()         # calibrated option letters (core/conformal.py); () without one
    prediction_set_coverage: float = 0.0         # the calibration's coverage; 0 when there is no calibrated set

    @property
    def scene(self) -> SceneGraph:
        return self.parsed.scene
