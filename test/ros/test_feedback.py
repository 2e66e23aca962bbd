"""Action feedback of one goal (ros/feedback.py), without a node: what a retry after out of memory streams again."""

from spatialthinker_ros.action import AskSpatial as AskSpatialAction
from spatialthinker_ros.msg import SceneGraph
from spatialthinker_ros.ros.feedback import FEEDBACK_EVERY_TOKENS, FeedbackSink

SCENE = '<observe>a cup</observe><scene>{"objects": [{"id": "cup.1", "bbox": [1, 2, 3, 4]}]}</scene>'
READY, GENERATING = AskSpatialAction.Feedback.STAGE_SCENE_READY, AskSpatialAction.Feedback.STAGE_GENERATING


def test_a_retry_on_a_smaller_image_streams_its_own_scene_graph_and_progress():
    sent, graphs = [], []
    sink = FeedbackSink(lambda stage, tokens, graph: sent.append((stage, tokens, graph is not None)),
                        post=lambda call: call(),
                        partial_scene=lambda text: graphs.append(text) or SceneGraph())
    sink("<observe>a cup</observe>", 4)
    sink(SCENE, 20)                                       # the first try's scene: from the larger image
    sink(SCENE + "<think>", 20 + FEEDBACK_EVERY_TOKENS)
    assert sent == [(GENERATING, 4, False), (READY, 20, True), (READY, 20 + FEEDBACK_EVERY_TOKENS, False)]
    sink.reset()                                          # out of memory: the retry starts over
    sink("<observe>a cup</observe>", 3)
    sink(SCENE, 18)
    assert sent[3:] == [(GENERATING, 3, False), (READY, 18, True)], "the retry's scene graph is sent, as final"
    assert graphs == [SCENE, SCENE]
