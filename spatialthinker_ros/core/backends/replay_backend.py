"""Answers from recorded model outputs: deterministic runs of the whole pipeline without a GPU or a server.

Replay file format: JSON Lines, one object per line (blank lines are skipped).

    {"question": "<the question exactly as asked>", "response": "<raw model output>"}

The first line whose "question" equals the request's question is used; no such line answers NO_MATCH.
Other keys are ignored (e.g. "source"), except two that rehearse failures deterministically:

    {"question": "...", "error": "out_of_memory"}                                  every match fails
    {"question": "...", "error": "out_of_memory", "times": 1, "response": "..."}   the first match fails,
                                                                                    later ones answer "response"

"error" is a BackendErrorKind value (the kind a real backend would report): "unavailable" (server down),
"timeout", "out_of_memory" (the ROS node then retries once on a smaller image), "no_match" or "failed"; or
"raise", which makes generate() raise for the whole batch, as a backend bug would (the scheduler then fails
that batch with "failed"). "times" (an integer >= 1) fails only the first N requests that match the line,
counted per backend (so a node's `configure` starts the count again); it needs a "response" for afterwards.

A line may hold its generation open until a file exists, so a test or a rehearsal decides when a long generation
ends instead of racing the clock; `latency_s` (replay_latency) is then the longest it lasts. It may also name a file
the backend creates when a generation that matches it starts, so they know when the model is busy with it:

    {"question": "...", "response": "...", "until_file": "/tmp/release", "started_file": "/tmp/started"}

A line may carry the model's option probabilities, in option order, so planners can rehearse low-confidence
answers:

    {"question": "...", "response": "...", "option_probabilities": [0.55, 0.45]}

They must be finite and non-negative and sum to 1 within 0.01 (a malformed file is refused when loaded); they are
then renormalised to sum to exactly 1. They apply only when the request offers as many options as the list holds
(otherwise the answer carries none, and says why).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from spatialthinker_ros.core.backends.base import TextSink, cut_after_scene_end, renormalised
from spatialthinker_ros.core.types import BackendError, BackendErrorKind, InferenceRequest, InferenceResult

# Streaming consumers get the text in this many growing pieces, the last one being the whole answer.
_STREAM_CHUNKS = 4
_POLL_S = 0.01          # how often a held generation looks for its "until_file"
_SUM_TOLERANCE = 0.01   # how far a line's option probabilities may sum from 1 (rounded values written by hand)
RAISE = "raise"   # "error" value that makes generate() raise instead of answering with a BackendError
ERROR_NAMES = tuple(kind.value for kind in BackendErrorKind) + (RAISE,)


class ReplayedCrash(RuntimeError):
    """What generate() raises for a line with "error": "raise"."""


@dataclass(frozen=True)
class ReplayConfig:
    """`replay_file` is JSON Lines of {"question", "response"} (optionally "error", "times"): see the module doc."""

    replay_file: str
    model: str = "replay"
    latency_s: float = 0.0     # simulated model time per generate() call, for load tests
    max_batch_size: int = 8

    def __post_init__(self) -> None:
        if self.latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, not {self.latency_s}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, not {self.max_batch_size}")


@dataclass(frozen=True)
class ReplayRecord:
    """One line of a replay file: the response, or the error to fail with (the first `times` matches, or always)."""

    response: Optional[str]
    error: Optional[str] = None
    times: Optional[int] = None
    option_probabilities: Optional[tuple[float, ...]] = None   # in option order, summing to 1
    until_file: Optional[str] = None   # the generation ends once this file exists (within latency_s)
    started_file: Optional[str] = None   # created when a generation matching this line starts


class ReplayBackend:
    """Returns the first recorded response whose question equals the request's question exactly."""

    name = "replay"
    max_image_pixels = None   # the image is not looked at

    def __init__(self, config: ReplayConfig):
        self.config = config
        self.model_name = config.model
        self.max_batch_size = config.max_batch_size
        if not config.replay_file.strip():    # Path("") would be the current folder: "replay file . does not exist"
            raise ValueError("replay_file is not set: the replay backend needs a JSON Lines file of recorded "
                             "answers (node parameter replay_file, command-line --replay-file)")
        self._records = load_replay_file(Path(config.replay_file))
        self._matches: dict[str, int] = {}   # question -> requests matched so far (generate runs on one thread)

    def generate(self, requests: Sequence[InferenceRequest]) -> list[Union[InferenceResult, BackendError]]:
        if len(requests) > self.max_batch_size:
            raise ValueError(f"{len(requests)} requests exceed max_batch_size {self.max_batch_size}")
        started = time.perf_counter()
        for record in map(self._records.get, (request.question for request in requests)):
            if record is not None and record.started_file:
                Path(record.started_file).touch()
        if requests and self.config.latency_s:
            self._spend_latency(requests)
        failures = [self._failure(request.question) for request in requests]
        if RAISE in failures:
            raise ReplayedCrash("replayed backend crash")
        return [failure or self._answer(request, started) for request, failure in zip(requests, failures)]

    def close(self) -> None:
        """Nothing to free."""

    def _spend_latency(self, requests: Sequence[InferenceRequest]) -> None:
        """latency_s of model time, ended early once the "until_file" of a line the batch matches exists."""
        records = (self._records.get(request.question) for request in requests)
        held = [Path(record.until_file) for record in records if record is not None and record.until_file]
        if not held:
            time.sleep(self.config.latency_s)
            return
        deadline = time.monotonic() + self.config.latency_s
        while not any(path.exists() for path in held) and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(_POLL_S, left))

    def _failure(self, question: str) -> Union[BackendError, str, None]:
        """Counts the match; returns the error this request fails with (RAISE for a crash), or None."""
        record = self._records.get(question)
        if record is None:
            return BackendError(BackendErrorKind.NO_MATCH, f'no recorded response for question "{question}"')
        count = self._matches[question] = self._matches.get(question, 0) + 1
        if record.error is None or (record.times is not None and count > record.times):
            return None
        if record.error == RAISE:
            return RAISE
        of = f" ({count} of {record.times})" if record.times is not None else ""
        return BackendError(BackendErrorKind(record.error), f"replayed {record.error} error{of}")

    def _answer(self, request: InferenceRequest, started: float) -> InferenceResult:
        text = self._records[request.question].response
        if request.scene_only:
            text = cut_after_scene_end(text)
        tokens = len(text.split())
        probabilities, note = self._option_probabilities(request)
        if request.on_text:
            sink = TextSink(request.on_text)
            for chunk in range(1, _STREAM_CHUNKS + 1):
                sink(text[: len(text) * chunk // _STREAM_CHUNKS], tokens * chunk // _STREAM_CHUNKS)
        return InferenceResult(
            text=text,
            prompt_tokens=len(request.prompt.split()),
            completion_tokens=tokens,
            model=self.model_name,
            seconds=time.perf_counter() - started,
            option_probabilities=probabilities,
            option_probabilities_note=note,
        )

    def _option_probabilities(self, request: InferenceRequest) -> tuple[tuple[float, ...], str]:
        offered = len(request.offered_options)
        recorded = self._records[request.question].option_probabilities
        if not offered or request.scene_only:
            return (), ""
        if recorded is None:
            return (), "the replay line has no option_probabilities"
        if len(recorded) != offered:
            return (), f"the replay line has {len(recorded)} option_probabilities for {offered} options"
        return recorded, ""


def load_replay_file(path: Path) -> dict[str, ReplayRecord]:
    """question -> record; the first line for a question wins. A missing file or malformed line is a ValueError."""
    if not path.is_file():
        raise ValueError(f"replay file {path} does not exist")
    records: dict[str, ReplayRecord] = {}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            parsed = _record(record)
            if isinstance(parsed, str):
                raise ValueError(f"{path}:{number}: {parsed}")
            records.setdefault(record["question"], parsed)
    return records


def _record(record: object) -> Union[ReplayRecord, str]:
    """The line as a record, or why it is malformed."""
    if not isinstance(record, dict) or not isinstance(record.get("question"), str):
        return 'expected an object with string "question" and "response"'
    response, error, times = record.get("response"), record.get("error"), record.get("times")
    until_file, started_file = record.get("until_file"), record.get("started_file")
    probabilities = _probabilities(record.get("option_probabilities"))
    if isinstance(probabilities, str):
        return probabilities
    for name, path in (("until_file", until_file), ("started_file", started_file)):
        if path is not None and not (isinstance(path, str) and path):
            return f'"{name}" must be a non-empty path, not {path!r}'
    if error is None:
        if not isinstance(response, str):
            return 'expected an object with string "question" and "response"'
        if times is not None:
            return '"times" needs an "error"'
        return ReplayRecord(response, option_probabilities=probabilities, until_file=until_file,
                            started_file=started_file)
    if error not in ERROR_NAMES:
        return f'"error" must be one of {", ".join(ERROR_NAMES)}, not {error!r}'
    if times is not None and (isinstance(times, bool) or not isinstance(times, int) or times < 1):
        return f'"times" must be an integer >= 1, not {times!r}'
    if response is not None and not isinstance(response, str):
        return '"response" must be a string'
    if times is not None and response is None:
        return '"times" needs a "response" to answer with after the failures'
    return ReplayRecord(response, error, times, probabilities, until_file, started_file)


def _probabilities(value: object) -> Union[tuple[float, ...], str, None]:
    """A line's "option_probabilities" renormalised to sum to 1, or why they are malformed (None when absent)."""
    if value is None:
        return None
    if (not isinstance(value, list) or not value
            or not all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in value)):
        return f'"option_probabilities" must be a non-empty list of numbers, not {value!r}'
    try:
        probabilities = renormalised(value)
    except ValueError as exc:
        return f'"option_probabilities": {exc}'
    if abs(math.fsum(value) - 1) > _SUM_TOLERANCE:
        return f'"option_probabilities" must sum to 1 (within {_SUM_TOLERANCE}), not {math.fsum(value):g}'
    return probabilities
