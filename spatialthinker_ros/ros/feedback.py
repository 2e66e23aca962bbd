"""Action feedback: the stage, tokens so far and, as soon as it is complete, the scene graph of a running goal."""

from __future__ import annotations

import threading
from typing import Callable, Optional

from spatialthinker_ros.action import AskSpatial as AskSpatialAction
from spatialthinker_ros.core.parsing import scene_text_complete
from spatialthinker_ros.msg import SceneGraph

FEEDBACK_EVERY_TOKENS = 16
Feedback = Callable[[int, int, Optional[SceneGraph]], None]   # (stage, tokens generated, scene graph or None)


def goal_feedback(goal_handle) -> Feedback:
    """Publishes feedback on the goal while it is active (executor thread only)."""
    def feedback(stage: int, tokens: int, graph: Optional[SceneGraph]) -> None:
        if goal_handle.is_active:
            message = AskSpatialAction.Feedback(stage=stage, tokens_generated=tokens)
            if graph is not None:
                message.scene_graph = graph
            goal_handle.publish_feedback(message)
    return feedback


class FeedbackSink:
    """A goal's on_text: the scene graph as soon as it is complete, then progress every FEEDBACK_EVERY_TOKENS tokens.
    Runs on the worker thread; `post` hands each message to the executor thread, where the scene graph is made."""

    def __init__(self, feedback: Feedback, post: Callable[[Callable[[], None]], None],
                 partial_scene: Callable[[str], SceneGraph]):
        self._feedback, self._post, self._partial_scene = feedback, post, partial_scene
        self.reset()

    def reset(self) -> None:
        """Start over for a retry on a smaller image: its scene graph is sent again (the one sent came from the
        larger image), and its tokens count from 0. Called between the tries, while nothing streams."""
        self._scene_sent = threading.Event()
        self._progress = -FEEDBACK_EVERY_TOKENS

    def __call__(self, text: str, tokens: int) -> None:
        feedback = self._feedback
        if not self._scene_sent.is_set() and scene_text_complete(text):
            self._scene_sent.set()
            self._post(lambda: feedback(AskSpatialAction.Feedback.STAGE_SCENE_READY, tokens, self._partial_scene(text)))
        elif tokens - self._progress >= FEEDBACK_EVERY_TOKENS:
            self._progress = tokens
            stage = (AskSpatialAction.Feedback.STAGE_SCENE_READY if self._scene_sent.is_set()
                     else AskSpatialAction.Feedback.STAGE_GENERATING)
            self._post(lambda: feedback(stage, tokens, None))
