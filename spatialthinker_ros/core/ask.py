"""One question about one image, answered the same way everywhere: prepare -> run -> one retry on a smaller image
after out of memory -> finish.

The node (awaiting its scheduler), `spatialthinker-ask` (calling the backend) and the evaluation (batches of rows)
differ only in how a request is run, so that step is theirs and everything around it is here:

    flow = AskFlow(source, question, options, config)
    while flow.pending:
        flow.record(run(flow.request))        # run: a backend call, a scheduler ticket awaited, a batch ...
    result = flow.finish(backend_name)

The rules each step applies are request.py's (what may be asked, the retry size) and pipeline.py's (prompt, parse,
geometry); this is the only caller of prepare_request and smaller_request.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

from spatialthinker_ros.core.pipeline import PipelineConfig, finish_result, prepare_request, smaller_request
from spatialthinker_ros.core.prompt import Question
from spatialthinker_ros.core.request import answered
from spatialthinker_ros.core.sources import Source
from spatialthinker_ros.core.types import BackendError, InferenceRequest, InferenceResult, SpatialResult

# What running a request gave: the text, the backend's failure, or (evaluation batches) any exception it raised.
Outcome = Union[InferenceResult, BackendError, BaseException]


class AskFlow:
    """One question about `source` on its way through the model. Raises InvalidRequest at construction for
    anything request.py refuses; `request` is then the request to run while `pending`."""

    def __init__(self, source: Source, question: str, options: Sequence[str], config: PipelineConfig, *,
                 scene_only: bool = False, request_id: str = "", asked: Optional[Question] = None,
                 on_text: Optional[Callable[[str, int], None]] = None,
                 on_retry: Optional[Callable[[InferenceRequest], None]] = None):
        self.source, self.options, self.config = source, list(options), config
        self.request: InferenceRequest = prepare_request(source.rgb, question, self.options, config,
                                                         scene_only=scene_only, on_text=on_text,
                                                         request_id=request_id, asked=asked)
        self.outcome: Optional[Outcome] = None
        self.retried = False
        self._on_retry = on_retry

    @property
    def pending(self) -> bool:
        """Whether `request` still has to be run (the first time, or the retry)."""
        return self.outcome is None

    def record(self, outcome: Outcome) -> None:
        """What running `request` gave. The first time the backend runs out of memory, `request` becomes the same
        question about the source at half the size per side (on_retry is told) and the flow stays pending."""
        smaller = None if self.retried else smaller_request(self.request, self.source.rgb, self.config, outcome)
        if smaller is None:
            self.outcome = outcome
            return
        self.request, self.retried = smaller, True
        if self._on_retry is not None:
            self._on_retry(smaller)

    def finish(self, backend: str) -> SpatialResult:
        """The answer: boxes in the source's pixels, 3D positions from its depth. A backend failure raises the
        RequestError (ErrorCode.BACKEND) it becomes."""
        if self.outcome is None:
            raise RuntimeError("AskFlow.finish before its request ran")
        if isinstance(self.outcome, BaseException) and not isinstance(self.outcome, BackendError):
            raise self.outcome
        return self._result(answered(self.outcome, backend), self.options, scene_only=None)

    def partial_scene(self, text: str) -> SpatialResult:
        """The scene graph of streamed text whose scene is already closed, while the answer is still generated."""
        return self._result(InferenceResult(text=text), [], scene_only=True)

    def _result(self, inference: InferenceResult, options: Sequence[str], scene_only: Optional[bool]) -> SpatialResult:
        source = self.source
        return finish_result(self.request, inference, options, camera_size=source.size, depth=source.depth,
                             intrinsics=source.intrinsics, scene_only=scene_only, config=self.config,
                             retried=self.retried)
