"""spatialthinker_node: camera frames + questions in; answers, scene graphs and RViz markers out.

This module is the lifecycle wiring; requests are ros/request_handler.py's, the rules the core's. Camera
subscriptions exist only while the node is active, so an inactive node costs nothing.

Threads: one SingleThreadedExecutor thread runs every ROS callback (camera subscriptions only keep the latest
message), and the scheduler's worker thread runs the model; results come back through a guard condition, so rclpy
objects are only touched from the executor thread. No transition waits for a running generation longer than
TRANSITION_WAIT_S; cleanup and error processing never wait (the model is freed once it ends: core/runtime.py).
"""

from __future__ import annotations

import functools
import os
import traceback
import types
from typing import Mapping, Optional

from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from spatialthinker_ros.core.backends.settings import backend_settings
from spatialthinker_ros.core.config import answering_setup, lift_config_from, pipeline_config_from
from spatialthinker_ros.core.conformal import CalibrationError, CalibrationSetup, check_setup, read_calibration_file
from spatialthinker_ros.core.runtime import BackendRuntime
from spatialthinker_ros.core.types import BackendError
from spatialthinker_ros.ros.camera_inputs import CameraInput, camera_qos, topic_prefix
from spatialthinker_ros.ros.handoff import ExecutorHandoff
from spatialthinker_ros.ros.outputs import AnswerOutputs
from spatialthinker_ros.ros.parameters import PARAMETERS, check_parameters, descriptor
from spatialthinker_ros.ros.replies import ReplyCourier
from spatialthinker_ros.ros.request_handler import Configured, RequestHandler
from spatialthinker_ros.ros.stats import StatsPublisher
from spatialthinker_ros.ros.throttle import ThrottledWarnings

TRANSITION_WAIT_S = 5.0     # activate, configure and shutdown wait this long for a running generation (callbacks wait)
# Test seam (docs/node.md, Lifecycle): comma-separated transitions (configure, activate, deactivate, cleanup) that
# each raise a RuntimeError once, at the end of their first success
FAIL_TRANSITIONS_ENV = "SPATIALTHINKER_FAIL_TRANSITIONS"


def _reported(transition):
    """rclpy turns an exception in a transition into on_error without a word: say what it was first. Also where
    the test seam (FAIL_TRANSITIONS_ENV) raises."""
    @functools.wraps(transition)
    def run(self: SpatialThinkerNode, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            result = transition(self, state)
            name = transition.__name__.removeprefix("on_")
            if result == TransitionCallbackReturn.SUCCESS and name in self._faults:
                self._faults.discard(name)
                raise RuntimeError(f"{name}: failure asked for by {FAIL_TRANSITIONS_ENV}")
            return result
        except Exception:
            self.get_logger().error(f"{transition.__name__} raised:\n{traceback.format_exc()}")
            raise
    return run


class SpatialThinkerNode(LifecycleNode):
    def __init__(self, **kwargs):
        super().__init__("spatialthinker", **kwargs)
        self.add_on_set_parameters_callback(check_parameters)
        for spec in PARAMETERS:
            self.declare_parameter(spec.name, spec.default, descriptor(spec))
        # A request coroutine holds its callback group while it awaits the model: a reentrant group lets frames,
        # other requests and results coming back run meanwhile on the one executor thread.
        self._group = ReentrantCallbackGroup()
        self._handoff = ExecutorHandoff(self, self._group)   # worker threads -> the executor thread
        self._warn_throttled = ThrottledWarnings(self.get_logger())
        self._state = "unconfigured"   # rclpy offers no public query of a LifecycleNode's own state
        self._faults = set(filter(None, os.environ.get(FAIL_TRANSITIONS_ENV, "").split(",")))
        self._runtime = BackendRuntime(self.get_logger(), on_released=lambda: self._handoff.post(self._publish_stats))
        self._requests = RequestHandler(self, self._runtime, self._handoff, self._warn_throttled,
                                        lambda: self._state, self._publish_stats)
        self._camera_subscriptions = []
        self._setup: Optional[CalibrationSetup] = None   # the loaded backend's (config.answering_setup)
        self._setup_problem = ""                          # why there is none while a backend is loaded
        self._stats = StatsPublisher(self)
        # A reply the transport drops because the caller asked before its reply reader was matched is sent again
        self.replies = ReplyCourier(self, self._group, on_change=self._publish_stats)
        self._requests.serve(self._group)
        self.replies.guard_all()   # ~/ask and rclpy's parameter and lifecycle services

    @property
    def cameras(self) -> Mapping[str, CameraInput]:
        """The configured cameras by name, read-only (their frame counters are what ~/stats reports)."""
        configured = self._requests.configured
        return types.MappingProxyType(configured.cameras if configured else {})

    @property
    def requests_in_progress(self) -> int:
        """Requests accepted and not yet answered."""
        return self._requests.in_progress

    def _param(self, name: str):
        return self.get_parameter(name).value

    # ---------------------------------------------------------------- lifecycle
    @_reported
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        p = self._param
        values = {spec.name: p(spec.name) for spec in PARAMETERS}
        try:   # the calibration file before the model loads: a bad one fails in milliseconds
            calibration = read_calibration_file(p("calibration_file"))
            pipeline = pipeline_config_from(values, lift=lift_config_from(values), calibration=calibration)
            backend = self._runtime.load(p("backend"), backend_settings(p("backend"), values), TRANSITION_WAIT_S)
        except (CalibrationError, BackendError, ValueError, OSError) as exc:
            self.get_logger().error(f"cannot configure: {exc}")
            return TransitionCallbackReturn.FAILURE
        try:   # what the loaded model is (weights, dtype, ...): the setup a calibration must have been made with
            self._setup, self._setup_problem = answering_setup(backend, values), ""
            check_setup(calibration, p("calibration_file"), self._setup)
        except (CalibrationError, BackendError, ValueError, OSError) as exc:
            if calibration is not None:
                self.get_logger().error(f"cannot configure: {exc}")
                self._runtime.release()
                self._setup = None
                self._publish_stats()
                return TransitionCallbackReturn.FAILURE
            self._setup, self._setup_problem = None, str(exc)   # ~/stats says why; nothing depends on it here
        if calibration is not None:
            self.get_logger().info(f"prediction sets: calibration {p('calibration_file')} loaded (coverage "
                                   f"{calibration.coverage:g}, n = {calibration.n} rows)")
        pipeline = pipeline.for_backend(backend)
        transport = "image/compressed" if p("image_transport") == "compressed" else "image"
        cameras = {name: CameraInput(name, self.resolve_topic_name(f"{topic_prefix(name)}{transport}"),
                                     pipeline.max_request_image_pixels) for name in p("cameras")}
        self._requests.configured = Configured(pipeline, cameras, AnswerOutputs(self), backend.name, p("depth_scale"))
        self._publish_stats()
        return self._entered("inactive", super().on_configure(state))

    @_reported
    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        # Never a second worker on a backend still inside generate(): fail, and activate again once it has ended
        if not self._runtime.start(self._param("queue_size"), wait_s=TRANSITION_WAIT_S):
            self.get_logger().error("cannot activate: the backend is still generating the answer to a request "
                                    "taken before the last deactivation; activate again once it has finished")
            return TransitionCallbackReturn.FAILURE
        qos = camera_qos(self._param("image_reliability"))
        for camera in self._requests.configured.cameras.values():
            self._camera_subscriptions += camera.subscribe(
                self, qos, self._param("use_depth"), self._group, self._warn_throttled,
                lambda: self.get_clock().now().nanoseconds * 1e-9, lambda: self._param("max_image_age"))
        self.get_logger().info("active: answering on ~/ask and ~/ask_action")
        return self._entered("active", super().on_activate(state))

    @_reported
    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.stop_answering("node deactivated")
        self._unsubscribe_cameras()
        return self._entered("inactive", super().on_deactivate(state))

    @_reported
    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._unconfigure("node cleaned up")
        return self._entered("unconfigured", super().on_cleanup(state))

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        """A transition raised: undo what was set up, as cleanup does (never waiting), and go to unconfigured."""
        self.get_logger().error(f"a transition from {state.label} raised: the node stops answering, drops its camera "
                                "subscriptions and frees the model; configure again to go on")
        self._unconfigure("a transition failed")
        return self._entered("unconfigured", super().on_error(state))

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.close()
        return self._entered("finalized", super().on_shutdown(state))

    def close(self, wait_s: float = TRANSITION_WAIT_S) -> None:
        """Answer pending callers and free the model; safe to call more than once. For exiting: a generation still
        running after `wait_s` is left to finish (it cannot be interrupted), the process's memory going with it."""
        self._unconfigure("node shutting down")
        self._runtime.wait_released(wait_s)
        self._handoff.close()   # a release still running must not post to a node that is going away

    def stop_answering(self, reason: str) -> None:
        """Refuse new requests and answer every pending one (ERROR_NOT_ACTIVE) now; never blocks for long."""
        if self._runtime.stop(reason):
            self._publish_stats()

    def _unconfigure(self, reason: str) -> None:
        """Back to nothing loaded, at once: pending callers answered, cameras and outputs dropped, the model freed
        now or, while a generation still runs, once it has ended."""
        self.stop_answering(reason)
        self._unsubscribe_cameras()
        configured, self._requests.configured = self._requests.configured, None
        if configured is not None:
            configured.outputs.destroy()
        self._runtime.release()
        self._publish_stats()

    def _unsubscribe_cameras(self) -> None:
        for subscription in self._camera_subscriptions:
            self.destroy_subscription(subscription)
        self._camera_subscriptions.clear()
        for camera in self.cameras.values():
            camera.forget_frames()

    def _entered(self, state: str, result: TransitionCallbackReturn) -> TransitionCallbackReturn:
        self._state = state if result == TransitionCallbackReturn.SUCCESS else self._state
        return result

    def _publish_stats(self) -> None:
        runtime, configured = self._runtime, self._requests.configured
        self._stats.publish(runtime.stats(), self.cameras, self.replies.counts(), runtime.state, runtime.model_name,
                            configured.pipeline.calibration if configured else None,
                            self._setup if runtime.state == "loaded" else None, self._setup_problem)
