"""A second process for the interface tests: echoes SceneGraphs and serves AskSpatial (service + action).

Run: python interface_peer.py. It answers over the wire with values derived from the request, so the test
can check every field crossed the process boundary intact.
"""

import time

import rclpy
from rclpy.action import ActionServer
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node

from spatialthinker_ros.action import AskSpatial as AskSpatialAction
from spatialthinker_ros.msg import SceneGraph, SceneObject, SpatialAnswer
from spatialthinker_ros.srv import AskSpatial


def answer_for(question, options, image) -> SpatialAnswer:
    answer = SpatialAnswer()
    answer.header = image.header
    answer.question = question
    answer.options = list(options)
    answer.answer = f"(B) {options[1]}" if len(options) > 1 else "echo"
    answer.choice = "B" if len(options) > 1 else ""
    answer.scene_graph.header = image.header
    answer.scene_graph.image_width = image.width
    answer.scene_graph.image_height = image.height
    answer.scene_graph.objects = [SceneObject(id="cup.1", label="cup", x_min=1.0, y_min=2.0, x_max=3.0,
                                              y_max=4.0)]
    answer.status = SpatialAnswer.STATUS_COMPLETE
    answer.completion_tokens = len(question)
    return answer


class Peer(Node):
    def __init__(self):
        super().__init__("interface_peer")
        group = ReentrantCallbackGroup()
        self.echo = self.create_publisher(SceneGraph, "scene_graph_echo", 10)
        self.create_subscription(SceneGraph, "scene_graph_in", self.echo.publish, 10)
        self.create_service(AskSpatial, "ask", self.on_ask, callback_group=group)
        ActionServer(self, AskSpatialAction, "ask_action", self.on_goal, callback_group=group)

    def on_ask(self, request, response):
        response.success = True
        response.error_code = AskSpatial.Response.ERROR_NONE
        response.answer = answer_for(request.question, request.options, request.image)
        return response

    def on_goal(self, goal_handle):
        goal = goal_handle.request
        for stage in (AskSpatialAction.Feedback.STAGE_QUEUED, AskSpatialAction.Feedback.STAGE_GENERATING,
                      AskSpatialAction.Feedback.STAGE_SCENE_READY):
            feedback = AskSpatialAction.Feedback(stage=stage, tokens_generated=10 * stage)
            if stage == AskSpatialAction.Feedback.STAGE_SCENE_READY:
                feedback.scene_graph = answer_for(goal.question, goal.options, goal.image).scene_graph
            goal_handle.publish_feedback(feedback)
            time.sleep(0.1)
        goal_handle.succeed()
        return AskSpatialAction.Result(success=True, answer=answer_for(goal.question, goal.options, goal.image))


def main():
    rclpy.init()
    executor = MultiThreadedExecutor()
    executor.add_node(Peer())
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
