"""~/stats: the node's counters, so tests, benchmarks and operators read its behaviour from a topic, not its log.

std_msgs/String holding one JSON object, on a reliable, transient-local topic of depth 1 (a late subscriber gets
the last one). Published after every reply (service or action), when a reply counter changes, when the node
stops answering and when its backend is loaded or released:

    scheduler  the request scheduler's SchedulerStats (core/scheduling.py: submitted, queued, running, completed,
               failed, timed_out, cancelled, stopped, rejected, batches, max_queue_depth), counted since the last
               activation; null while the node has never been active
    cameras    per camera name: frames_received (colour frames that arrived), frames_dropped (refused on arrival:
               bad layout, stamps going backwards), frames_decoded (colour frames decoded, one per request that
               used a frame: frames are decoded only then)
    replies    service replies the transport dropped (ros/replies.py): dropped (sends refused, first sends and
               resends), resent (replies that went out on a resend), abandoned (replies still refused after
               RESEND_FOR_S: their callers never get them), pending (replies waiting for their next resend);
               counted since the node started
    backend    state (core/runtime.py: BACKEND_STATES): "none" (never configured), "loaded", "releasing" (cleaned up
               while a generation still runs: freed once it has ended) or "released" (closed, its memory freed);
               model: the loaded model's name, else null;
               setup: what a calibration must have been made with to hold for the loaded backend (core/conformal.py
               CalibrationSetup: weights' fingerprint, resolved dtype, quantization, image limits, prompt), else
               null; setup_problem: why it is null while a backend is loaded (weights that cannot be fingerprinted,
               a server that cannot say which model it serves), else ""; `spatialthinker-eval run --node` records it
    calibration  the calibration prediction sets use (calibration_file, core/conformal.py): coverage, threshold,
               rows and setup; null without one
    frame_memory  what the process did about freed frame buffers (ros/camera_inputs.py, keep_freed_frame_memory);
               null where it was not called
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import String

from spatialthinker_ros.core.conformal import Calibration, CalibrationSetup
from spatialthinker_ros.core.scheduling import SchedulerStats
from spatialthinker_ros.ros.camera_inputs import CameraInput, frame_memory

STATS_TOPIC = "~/stats"
STATS_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                       durability=DurabilityPolicy.TRANSIENT_LOCAL)


def stats_dict(scheduler: Optional[SchedulerStats], cameras: Mapping[str, CameraInput], replies: Mapping[str, int],
               backend_state: str, model: Optional[str], calibration: Optional[Calibration] = None,
               setup: Optional[CalibrationSetup] = None, setup_problem: str = "") -> dict[str, Any]:
    """What ~/stats carries (module docstring)."""
    return {
        "scheduler": dataclasses.asdict(scheduler) if scheduler is not None else None,
        "cameras": {name: {"frames_received": camera.frames_received, "frames_dropped": camera.frames_dropped,
                           "frames_decoded": camera.frames_decoded} for name, camera in cameras.items()},
        "replies": dict(replies),
        "backend": {"state": backend_state, "model": model,
                    "setup": dataclasses.asdict(setup) if setup is not None else None,
                    "setup_problem": setup_problem if backend_state == "loaded" and setup is None else ""},
        "frame_memory": frame_memory(),
        "calibration": None if calibration is None else {
            "coverage": calibration.coverage, "threshold": calibration.threshold, "rows": calibration.n,
            "setup": dataclasses.asdict(calibration.setup)},
    }


class StatsPublisher:
    """Publishes the node's counters on ~/stats; the last scheduler's figures stay after it stopped."""

    def __init__(self, node: Any):
        self._publisher = node.create_publisher(String, STATS_TOPIC, STATS_QOS)
        self._last_scheduler: Optional[SchedulerStats] = None

    def publish(self, scheduler: Optional[SchedulerStats], cameras: Mapping[str, CameraInput],
                replies: Mapping[str, int], backend_state: str, model: Optional[str],
                calibration: Optional[Calibration] = None, setup: Optional[CalibrationSetup] = None,
                setup_problem: str = "") -> None:
        if scheduler is not None:
            self._last_scheduler = scheduler
        message = stats_dict(self._last_scheduler, cameras, replies, backend_state, model, calibration, setup,
                             setup_problem)
        self._publisher.publish(String(data=json.dumps(message)))
