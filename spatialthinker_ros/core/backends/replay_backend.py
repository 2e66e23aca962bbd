"""Answers from recorded model outputs: deterministic runs of the whole pipeline without a GPU or a server."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

from spatialthinker_ros.core.backends.base import TextSink, cut_after_scene_end
from spatialthinker_ros.core.types import BackendError, BackendErrorKind, InferenceRequest, InferenceResult

# Streaming consumers get the text in this many growing pieces, the last one being the whole answer.
_STREAM_CHUNKS = 4


@dataclass(frozen=True)
class ReplayConfig:
    """`replay_file` is JSON Lines: {"question": "<as asked>", "response": "<raw model output>"} per line."""

    replay_file: str
    model: str = "replay"
    latency_s: float = 0.0     # simulated model time per generate() call, for load tests
    max_batch_size: int = 8

    def __post_init__(self) -> None:
        if self.latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, not {self.latency_s}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, not {self.max_batch_size}")


class ReplayBackend:
    """Returns the first recorded response whose question equals the request's question exactly."""

    name = "replay"

    def __init__(self, config: ReplayConfig):
        self.config = config
        self.model_name = config.model
        self.max_batch_size = config.max_batch_size
        self._responses = load_replay_file(Path(config.replay_file))

    def generate(self, requests: Sequence[InferenceRequest]) -> list[Union[InferenceResult, BackendError]]:
        if len(requests) > self.max_batch_size:
            raise ValueError(f"{len(requests)} requests exceed max_batch_size {self.max_batch_size}")
        started = time.perf_counter()
        if requests and self.config.latency_s:
            time.sleep(self.config.latency_s)
        return [self._answer(request, started) for request in requests]

    def close(self) -> None:
        """Nothing to free."""

    def _answer(self, request: InferenceRequest, started: float) -> Union[InferenceResult, BackendError]:
        text = self._responses.get(request.question)
        if text is None:
            return BackendError(BackendErrorKind.NO_MATCH, f'no recorded response for question "{request.question}"')
        if request.scene_only:
            text = cut_after_scene_end(text)
        tokens = len(text.split())
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
        )


def load_replay_file(path: Path) -> dict[str, str]:
    """question -> response; the first line for a question wins. A missing file or malformed line is a ValueError."""
    if not path.is_file():
        raise ValueError(f"replay file {path} does not exist")
    responses: dict[str, str] = {}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not (
                isinstance(record, dict)
                and isinstance(record.get("question"), str)
                and isinstance(record.get("response"), str)
            ):
                raise ValueError(f'{path}:{number}: expected an object with string "question" and "response"')
            responses.setdefault(record["question"], record["response"])
    return responses
