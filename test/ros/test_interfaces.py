"""The package's interfaces are real rosidl types that cross process boundaries intact."""

import sys
from pathlib import Path

import pytest
from rclpy.action import ActionClient
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, DurabilityPolicy
from spatialthinker_ros.testing.node_client import spin_future, spin_until
from sensor_msgs.msg import Image

from spatialthinker_ros.action import AskSpatial as AskSpatialAction
from spatialthinker_ros.core.types import RelationCheck
from spatialthinker_ros.msg import SceneGraph, SceneObject, SceneRelation, SpatialAnswer
from spatialthinker_ros.srv import AskSpatial, CancelAsk

PEER = str(Path(__file__).parent / "interface_peer.py")
TIMEOUT = 20.0


def test_every_interface_imports_with_documented_fields():
    obj = SceneObject()
    assert set(obj.get_fields_and_field_types()) == {
        "id", "label", "x_min", "y_min", "x_max", "y_max", "has_position", "position", "size", "depth_spread",
        "depth_ambiguous"}
    assert SceneObject.get_fields_and_field_types()["position"] == "geometry_msgs/Point"
    assert (obj.depth_spread, obj.depth_ambiguous) == (0.0, False)
    assert SceneRelation.get_fields_and_field_types() == {"subject": "string", "predicate": "string",
                                                          "object": "string", "check": "uint8", "check_note": "string"}
    for check in RelationCheck:      # the core's verdicts are the message's constants
        assert getattr(SceneRelation, f"CHECK_{check.name}") == check.value
    assert set(SceneGraph.get_fields_and_field_types()) == {
        "header", "image_width", "image_height", "objects", "relations"}
    answer_fields = SpatialAnswer.get_fields_and_field_types()
    for name in ("header", "request_id", "question", "options", "answer", "choice", "observation", "reasoning",
                 "scene_graph", "status", "status_message", "model", "prompt_tokens", "completion_tokens",
                 "inference_time"):
        assert name in answer_fields, name
    assert answer_fields["inference_time"] == "builtin_interfaces/Duration"
    assert (answer_fields["option_probabilities"], answer_fields["prediction_set"],
            answer_fields["prediction_set_coverage"]) == ("sequence<float>", "sequence<string>", "float")
    assert (SpatialAnswer.STATUS_COMPLETE, SpatialAnswer.STATUS_PARTIAL, SpatialAnswer.STATUS_NO_ANSWER) == (0, 1, 2)
    request_fields = AskSpatial.Request.get_fields_and_field_types()
    assert request_fields == {"question": "string", "options": "sequence<string>", "camera": "string",
                              "image": "sensor_msgs/Image", "scene_only": "boolean", "max_image_age": "double",
                              "return_image": "boolean", "request_id": "string"}
    goal_fields = AskSpatialAction.Goal.get_fields_and_field_types()
    assert goal_fields == {k: v for k, v in request_fields.items() if k != "request_id"}, "the goal id is its id"
    assert CancelAsk.Request.get_fields_and_field_types() == {"request_id": "string"}
    assert CancelAsk.Response.get_fields_and_field_types() == {"cancelled": "boolean"}
    response_fields = AskSpatial.Response.get_fields_and_field_types()
    assert response_fields == {"success": "boolean", "error_code": "uint8", "message": "string",
                               "answer": "spatialthinker_ros/SpatialAnswer", "image": "sensor_msgs/Image"}
    assert AskSpatialAction.Result.get_fields_and_field_types() == response_fields
    codes = ["NONE", "INVALID_REQUEST", "NO_IMAGE", "STALE_IMAGE", "UNKNOWN_CAMERA", "BUSY", "BACKEND", "TIMEOUT",
             "NOT_ACTIVE", "CANCELLED"]
    for value, code in enumerate(codes):
        assert getattr(AskSpatial.Response, f"ERROR_{code}") == value
        assert getattr(AskSpatialAction.Result, f"ERROR_{code}") == value
    feedback = AskSpatialAction.Feedback.get_fields_and_field_types()
    assert feedback == {"stage": "uint8", "tokens_generated": "uint32",
                        "scene_graph": "spatialthinker_ros/SceneGraph"}


@pytest.fixture
def peer(spawn):
    proc = spawn([sys.executable, PEER], name="interface_peer")
    yield proc
    assert proc.alive(), proc.output()


def sample_graph() -> SceneGraph:
    graph = SceneGraph(image_width=640, image_height=480)
    graph.header.frame_id = "camera_color_optical_frame"
    graph.header.stamp.sec, graph.header.stamp.nanosec = 1234, 5678
    cup = SceneObject(id="cup.1", label="cup", x_min=10.5, y_min=20.0, x_max=110.0, y_max=220.25, has_position=True)
    cup.position.x, cup.position.y, cup.position.z = 0.1, -0.2, 1.5
    cup.size.x, cup.size.y, cup.size.z = 0.08, 0.1, 0.05
    cup.depth_spread, cup.depth_ambiguous = 0.012, True
    plate = SceneObject(id="plate.1", label="plate", x_min=300.0, y_min=200.0, x_max=500.0, y_max=300.0)
    graph.objects = [cup, plate]
    graph.relations = [SceneRelation(subject="cup.1", predicate="left of", object="plate.1",
                                     check=SceneRelation.CHECK_CONTRADICTED,
                                     check_note="cup.1 x=+0.10 m, plate.1 x=-0.30 m (difference 0.40 m, margin 0.05 m)")]
    return graph


def test_scene_graph_round_trip_between_processes(ros_context, peer):
    node = Node("scene_graph_round_trip", context=ros_context)
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
    pub = node.create_publisher(SceneGraph, "scene_graph_in", qos)
    received = []
    node.create_subscription(SceneGraph, "scene_graph_echo", received.append, qos)
    sent = sample_graph()

    def publish_and_check():
        if not received:
            pub.publish(sent)
        return bool(received)

    assert spin_until(node, publish_and_check, TIMEOUT), peer.output()
    echoed = received[0]
    assert echoed == sent
    assert echoed.objects[0].position.z == pytest.approx(1.5)
    assert (echoed.objects[0].depth_spread, echoed.objects[0].depth_ambiguous) == (pytest.approx(0.012), True)
    assert echoed.relations[0].predicate == "left of"
    assert echoed.relations[0].check == SceneRelation.CHECK_CONTRADICTED
    node.destroy_node()


def request_image() -> Image:
    image = Image(width=4, height=2, encoding="rgb8", step=12, data=bytes(range(24)))
    image.header.frame_id = "cam_optical"
    image.header.stamp.sec = 42
    return image


def test_ask_service_across_processes(ros_context, peer):
    node = Node("ask_client", context=ros_context)
    client = node.create_client(AskSpatial, "ask")
    assert spin_until(node, client.service_is_ready, TIMEOUT), peer.output()
    request = AskSpatial.Request(question="Where is the cup?", options=["left", "right"], image=request_image(),
                                 scene_only=False, max_image_age=0.5)
    response = spin_future(node, client.call_async(request), TIMEOUT)
    assert response.success and response.error_code == AskSpatial.Response.ERROR_NONE
    assert response.answer.question == "Where is the cup?"
    assert list(response.answer.options) == ["left", "right"]
    assert (response.answer.choice, response.answer.answer) == ("B", "(B) right")
    assert response.answer.header.stamp.sec == 42 and response.answer.header.frame_id == "cam_optical"
    assert (response.answer.scene_graph.image_width, response.answer.scene_graph.image_height) == (4, 2)
    assert response.answer.scene_graph.objects[0].id == "cup.1"
    node.destroy_node()


def test_ask_action_with_feedback_across_processes(ros_context, peer):
    node = Node("ask_action_client", context=ros_context)
    client = ActionClient(node, AskSpatialAction, "ask_action")
    assert spin_until(node, client.server_is_ready, TIMEOUT), peer.output()
    feedback = []
    goal = AskSpatialAction.Goal(question="Which is closer?", options=["cup", "plate"], image=request_image())
    handle = spin_future(node, client.send_goal_async(goal, feedback_callback=lambda m: feedback.append(m.feedback)),
                         TIMEOUT)
    assert handle.accepted
    result = spin_future(node, handle.get_result_async(), TIMEOUT).result
    assert result.success and result.answer.choice == "B"
    # feedback travels on its own topic: what was sent before the result may be taken after it
    assert spin_until(node, lambda: len(feedback) >= 3, TIMEOUT), feedback
    assert [f.stage for f in feedback] == [AskSpatialAction.Feedback.STAGE_QUEUED,
                                           AskSpatialAction.Feedback.STAGE_GENERATING,
                                           AskSpatialAction.Feedback.STAGE_SCENE_READY]
    assert feedback[-1].scene_graph.objects[0].label == "cup"
    assert feedback[0].scene_graph.objects == []
    client.destroy()
    node.destroy_node()
