"""The one interface every backend implements, and the generation settings they share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, Union

from spatialthinker_ros.core.types import BackendError, InferenceRequest, InferenceResult

SCENE_END_TAG = "</scene>"


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

    def generate(self, requests: Sequence[InferenceRequest]) -> list[Union[InferenceResult, BackendError]]: ...

    def close(self) -> None:
        """Free the model and any GPU memory; the backend is unusable afterwards."""
