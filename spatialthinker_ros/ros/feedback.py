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


def feedback_sink(feedback: Optional[Feedback], post: Callable[[Callable[[], None]], None],
                  partial_scene: Callable[[str], SceneGraph]) -> Optional[Callable[[str, int], None]]:
    """The request's on_text for an action goal (None for the service): the scene graph as soon as it is
    complete, then progress every FEEDBACK_EVERY_TOKENS tokens. Runs on the worker thread; `post` hands each
    message to the executor thread, where the scene graph is made."""
    if feedback is None:
        return None
    scene_sent = threading.Event()
    progress = {"tokens": -FEEDBACK_EVERY_TOKENS}

    def on_text(text: str, tokens: int) -> None:
        if not scene_sent.is_set() and scene_text_complete(text):
            scene_sent.set()
            post(lambda: feedback(AskSpatialAction.Feedback.STAGE_SCENE_READY, tokens, partial_scene(text)))
        elif tokens - progress["tokens"] >= FEEDBACK_EVERY_TOKENS:
            progress["tokens"] = tokens
            stage = (AskSpatialAction.Feedback.STAGE_SCENE_READY if scene_sent.is_set()
                     else AskSpatialAction.Feedback.STAGE_GENERATING)
            post(lambda: feedback(stage, tokens, None))
    return on_text
