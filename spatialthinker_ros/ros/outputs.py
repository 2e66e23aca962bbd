"""The node's output topics: ~/answer, ~/scene_graph, ~/markers and ~/debug_image.

Lifecycle publishers: they exist from configure to cleanup and publish only while the node is active.
"""

from __future__ import annotations

from typing import Optional

from rclpy.lifecycle import LifecycleNode
from rclpy.qos import QoSProfile
from sensor_msgs.msg import Image
from visualization_msgs.msg import MarkerArray

from spatialthinker_ros.core.annotate import draw_scene
from spatialthinker_ros.core.sources import Source
from spatialthinker_ros.core.types import SpatialResult
from spatialthinker_ros.msg import SceneGraph, SpatialAnswer
from spatialthinker_ros.ros.conversions import rgb_to_image_msg
from spatialthinker_ros.ros.visualization import scene_markers


class AnswerOutputs:
    """Publishes each answer, its scene graph, its markers and, while someone subscribes, the annotated image."""

    def __init__(self, node: LifecycleNode):
        self._node = node
        reliable = QoSProfile(depth=10)
        self._answer = node.create_lifecycle_publisher(SpatialAnswer, "~/answer", reliable)
        self._scene_graph = node.create_lifecycle_publisher(SceneGraph, "~/scene_graph", reliable)
        self._markers = node.create_lifecycle_publisher(MarkerArray, "~/markers", reliable)
        self._debug_image = node.create_lifecycle_publisher(Image, "~/debug_image", QoSProfile(depth=2))

    def publish(self, answer: SpatialAnswer, result: SpatialResult, source: Source,
                marker_lifetime: Optional[float], debug_image: bool) -> None:
        """`marker_lifetime`: seconds the markers stay in RViz (0 = forever), None = no markers. `debug_image`:
        publish the annotated image when someone subscribes (drawing it costs, so only then)."""
        self._answer.publish(answer)
        self._scene_graph.publish(answer.scene_graph)
        if marker_lifetime is not None:
            self._markers.publish(scene_markers(result.parsed.scene, source.header, marker_lifetime))
        if debug_image and self._debug_image.get_subscription_count() > 0:
            caption = result.parsed.answer or result.parsed.status.name.lower()
            self._debug_image.publish(rgb_to_image_msg(draw_scene(source.rgb, result.parsed.scene, caption),
                                                       source.header))

    def destroy(self) -> None:
        for publisher in (self._answer, self._scene_graph, self._markers, self._debug_image):
            self._node.destroy_lifecycle_publisher(publisher)
