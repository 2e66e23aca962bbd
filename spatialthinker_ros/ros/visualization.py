"""RViz markers for a scene graph: a 3D box and a label per located object, an arrow and a label per relation,
coloured by its check against the depth (core/relations.py: red contradicted, green consistent, amber uncertain).
An object whose depth is ambiguous has a faint box (AMBIGUOUS_ALPHA) and its label marked (annotate.AMBIGUOUS_MARK),
as in the debug image (legend in docs/node.md)."""

from __future__ import annotations

from geometry_msgs.msg import Point
from std_msgs.msg import Header
from visualization_msgs.msg import Marker, MarkerArray

from spatialthinker_ros.core.annotate import object_colour, object_label
from spatialthinker_ros.core.relations import VERDICT_COLOURS, verdict_label
from spatialthinker_ros.core.types import SceneGraph
from spatialthinker_ros.ros.conversions import duration_msg

MIN_EXTENT = 0.02  # metres: keep thin objects visible
BOX_ALPHA = 0.4
AMBIGUOUS_ALPHA = 0.15   # a faint box: the position is a guess between surfaces


def scene_markers(scene: SceneGraph, header: Header, lifetime_s: float) -> MarkerArray:
    """Markers in the source image's optical frame. Objects without a 3D position are left out."""
    lifetime = duration_msg(lifetime_s)
    markers = [Marker(header=header, action=Marker.DELETEALL)]
    centres = {}
    for i, obj in enumerate(scene.objects):
        if obj.position is None:
            continue
        p = obj.position
        r, g, b = (c / 255.0 for c in object_colour(i))
        box = Marker(header=header, ns="objects", id=2 * i, type=Marker.CUBE, action=Marker.ADD, lifetime=lifetime)
        box.pose.position.x, box.pose.position.y, box.pose.position.z = p.x, p.y, p.z
        box.pose.orientation.w = 1.0
        box.scale.x, box.scale.y, box.scale.z = (max(MIN_EXTENT, s) for s in (p.size_x, p.size_y, p.size_z))
        box.color.r, box.color.g, box.color.b = r, g, b
        box.color.a = AMBIGUOUS_ALPHA if p.ambiguous else BOX_ALPHA
        text = Marker(header=header, ns="labels", id=2 * i + 1, type=Marker.TEXT_VIEW_FACING, action=Marker.ADD,
                      lifetime=lifetime, text=object_label(obj))
        text.pose.position.x, text.pose.position.y = p.x, p.y - max(MIN_EXTENT, p.size_y) / 2 - 0.05
        text.pose.position.z = p.z
        text.pose.orientation.w = 1.0
        text.scale.z = 0.06
        text.color.r = text.color.g = text.color.b = text.color.a = 1.0
        markers += [box, text]
        centres[obj.id] = Point(x=p.x, y=p.y, z=p.z)
    for j, relation in enumerate(scene.relations):
        if relation.subject in centres and relation.object in centres:
            arrow = Marker(header=header, ns="relations", id=j, type=Marker.ARROW, action=Marker.ADD,
                           lifetime=lifetime, points=[centres[relation.subject], centres[relation.object]])
            arrow.pose.orientation.w = 1.0
            arrow.scale.x, arrow.scale.y, arrow.scale.z = 0.01, 0.03, 0.05
            r, g, b = (c / 255.0 for c in VERDICT_COLOURS[relation.check])
            arrow.color.r, arrow.color.g, arrow.color.b, arrow.color.a = r, g, b, 0.8
            start, end = centres[relation.subject], centres[relation.object]
            label = Marker(header=header, ns="relation_labels", id=j, type=Marker.TEXT_VIEW_FACING,
                           action=Marker.ADD, lifetime=lifetime, text=verdict_label(relation))
            label.pose.position.x, label.pose.position.y = (start.x + end.x) / 2, (start.y + end.y) / 2 - 0.03
            label.pose.position.z = (start.z + end.z) / 2
            label.pose.orientation.w = 1.0
            label.scale.z = 0.04
            label.color.r, label.color.g, label.color.b, label.color.a = r, g, b, 1.0
            markers += [arrow, label]
    return MarkerArray(markers=markers)
