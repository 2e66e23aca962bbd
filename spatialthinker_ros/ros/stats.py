"""~/stats: the node's counters, so tests, benchmarks and operators read its behaviour from a topic, not its log.

std_msgs/String holding one JSON object, on a reliable, transient-local topic of depth 1 (a late subscriber gets
the last one). Published after every reply (service or action) and when the node stops answering:

    scheduler  the request scheduler's SchedulerStats (core/scheduling.py: submitted, queued, running, completed,
               failed, timed_out, cancelled, stopped, rejected, batches, max_queue_depth), counted since the last
               activation; null while the node has never been active
    cameras    per camera name: frames_received (colour frames that arrived), frames_dropped (refused on arrival:
               bad layout, stamps going backwards), frames_decoded (colour frames decoded, one per request that
               used a frame: frames are decoded only then)
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import String

from spatialthinker_ros.core.scheduling import SchedulerStats
from spatialthinker_ros.ros.cameras import CameraInput

STATS_TOPIC = "~/stats"
STATS_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                       durability=DurabilityPolicy.TRANSIENT_LOCAL)


def stats_dict(scheduler: Optional[SchedulerStats], cameras: Mapping[str, CameraInput]) -> dict[str, Any]:
    """What ~/stats carries (module docstring)."""
    return {
        "scheduler": dataclasses.asdict(scheduler) if scheduler is not None else None,
        "cameras": {name: {"frames_received": camera.frames_received, "frames_dropped": camera.frames_dropped,
                           "frames_decoded": camera.frames_decoded} for name, camera in cameras.items()},
    }


class StatsPublisher:
    """Publishes the node's counters on ~/stats; the last scheduler's figures stay after it stopped."""

    def __init__(self, node: Any):
        self._publisher = node.create_publisher(String, STATS_TOPIC, STATS_QOS)
        self._last_scheduler: Optional[SchedulerStats] = None

    def publish(self, scheduler: Optional[SchedulerStats], cameras: Mapping[str, CameraInput]) -> None:
        if scheduler is not None:
            self._last_scheduler = scheduler
        self._publisher.publish(String(data=json.dumps(stats_dict(self._last_scheduler, cameras))))
