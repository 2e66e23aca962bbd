"""The one interface every backend implements, and the generation settings they share."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence, Union

from spatialthinker_ros.core.types import BackendError, InferenceRequest, InferenceResult

SCENE_END_TAG = "</scene>"
# Qwen2.5-VL processor limit on the pixels of one image (tokens = pixels / 784): 1280x720 stays whole (1196 image
# tokens), 1920x1080 becomes 1316x728 (1222 tokens, not 2691). Every backend applies it (Backend.max_image_pixels).
DEFAULT_MAX_PIXELS = 1003520


def cut_after_scene_end(text: str) -> str:
    """End a scene-only answer exactly at its first "</scene>", however far past it the backend stopped."""
    end = text.find(SCENE_END_TAG)
    return text if end < 0 else text[: end + len(SCENE_END_TAG)]


# The text since the answer tag opened, while it is still only "<answer", its ">", and whitespace or "(": the next
# token writes the option letter (group 1 is that run; "" right after "<answer").
_ANSWER_RUN = re.compile(r"<answer(>?[\s(]*)$")
_ANSWER_TAIL_CHARS = 24   # enough to hold "<answer" and a run of spaces and "(" after it
# How one token may write the letter L after a run: "L", " L", "\tL", "(L", " (L", with ">" first right after
# "<answer". Qwen2.5's vocabulary has the first four for every letter A-Z (and no other token that writes just one).
LETTER_FORMS = ("", " ", "\t", "(", " (")


def letter_written(run: str, piece: str) -> str:
    """The option letter a token writes at the letter position after `run`, or "" when it writes none."""
    match = re.fullmatch(r">[\s(]*([A-Z])", run + piece)
    return match.group(1) if match else ""


class LetterPosition:
    """Follows an answer token by token to its option letter's position: the first token after "<answer>" that is
    not whitespace or "(" (the card writes "<answer> (B) cat </answer>"; "<answer>B</answer>" occurs too).

    Before a token is fed, `run` is not None when that token is at the letter position if it leaves the run (the
    answer tag's text so far); once a token left it, `found` is True."""

    def __init__(self) -> None:
        self._tail = ""
        self.run: Optional[str] = None
        self.found = False

    def feed(self, piece: str) -> None:
        if self.found:
            return
        self._tail = (self._tail + piece)[-_ANSWER_TAIL_CHARS:]
        run, match = self.run, _ANSWER_RUN.search(self._tail)
        if match:
            self.run = match.group(1)
        elif run is not None:
            if (run + piece).startswith(">"):   # the tag was closed: this token sat at the letter position
                self.found = True
            self.run = None                     # or "<answer" began another word: look on


def renormalised(weights: Sequence[float]) -> tuple[float, ...]:
    """Option probabilities from non-negative weights (probabilities of the letters before renormalising over the
    offered ones): scaled to sum to 1. ValueError when a weight is negative or not finite, or all are zero."""
    values = [float(w) for w in weights]
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"option probabilities must be finite and non-negative, not {values}")
    total = math.fsum(values)
    if total <= 0:
        raise ValueError("option probabilities are all zero")
    return tuple(v / total for v in values)


class TextSink:
    """Streams to a request's on_text, whose bug must not cost the answer: after one raise (logged) it gets no more."""

    def __init__(self, on_text: Optional[Callable[[str, int], None]]):
        self._on_text = on_text

    def __call__(self, text: str, tokens: int) -> None:
        if self._on_text is None:
            return
        try:
            self._on_text(text, tokens)
        except Exception:
            logging.getLogger(__name__).exception("on_text callback failed; it gets no more text for this request")
            self._on_text = None


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings. Defaults follow the authors' evaluation: greedy, up to 2048 new tokens."""

    max_new_tokens: int = 2048
    do_sample: bool = False
    temperature: float = 1.0     # only used when do_sample
    top_p: float = 1.0           # only used when do_sample
    min_new_tokens: int = 0      # forcing length is for benchmarks and tests, never for users


class Backend(Protocol):
    """Turns prepared requests into raw model text.

    `generate` answers every request, in order, with either an InferenceResult or the BackendError that
    stopped that request; it raises only for bugs. Backends may be called from one worker thread at a time.
    """

    name: str            # "transformers" | "openai" | "replay"
    model_name: str      # what SpatialAnswer.model reports
    max_batch_size: int  # how many requests one generate() call may carry
    # Images must reach generate() already within this many pixels, at Qwen's smart_resize size, since the prompt
    # states the size (PipelineConfig.for_backend). None: the backend's own processor resizes (transformers), or
    # it does not look at the image (replay).
    max_image_pixels: Optional[int]

    def generate(self, requests: Sequence[InferenceRequest]) -> list[Union[InferenceResult, BackendError]]: ...

    def close(self) -> None:
        """Free the model and any GPU memory; the backend is unusable afterwards."""
