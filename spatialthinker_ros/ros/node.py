"""spatialthinker_node: camera frames + questions in; answers, scene graphs and RViz markers out.

The node translates messages, submits and publishes; the rules are the core's (core/ask.py, core/sources.py).
Camera subscriptions exist only while the node is active, so an inactive node costs nothing.

Threads: one SingleThreadedExecutor thread runs every ROS callback (camera subscriptions only keep the
latest message, so an idle node costs about what a bare subscriber does), and the scheduler's worker thread
runs the model. Requests are coroutines on the executor: they wait for the worker without blocking camera
callbacks or other requests. The worker hands results back through a guard condition, so rclpy objects
are only ever touched from the executor thread.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import types
import uuid
from typing import Mapping, Optional

from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import QoSProfile

from spatialthinker_ros.action import AskSpatial as AskSpatialAction
from spatialthinker_ros.core.ask import AskFlow
from spatialthinker_ros.core.backends.settings import backend_settings
from spatialthinker_ros.core.config import answering_setup, lift_config_from, pipeline_config_from
from spatialthinker_ros.core.conformal import CalibrationError, CalibrationSetup, check_setup, read_calibration_file
from spatialthinker_ros.core.pipeline import PipelineConfig
from spatialthinker_ros.core.request import ErrorCode, RequestError, check_question, internal_error
from spatialthinker_ros.core.runtime import BackendRuntime
from spatialthinker_ros.core.scheduling import RequestCancelled, Ticket
from spatialthinker_ros.core.sources import (Source, SourceSettings, camera_source, choose_camera, has_request_image,
                                             request_source)
from spatialthinker_ros.core.text import excerpt
from spatialthinker_ros.core.types import BackendError, InferenceRequest, InferenceResult, SpatialResult
from spatialthinker_ros.msg import SpatialAnswer
from spatialthinker_ros.ros.cameras import CameraInput, camera_qos, topic_prefix
from spatialthinker_ros.ros.feedback import FeedbackSink, goal_feedback
from spatialthinker_ros.ros.conversions import fill_response, scene_graph_msg, spatial_answer_msg
from spatialthinker_ros.ros.handoff import ExecutorHandoff
from spatialthinker_ros.ros.outputs import AnswerOutputs
from spatialthinker_ros.ros.parameters import PARAMETERS, check_parameters, descriptor
from spatialthinker_ros.ros.replies import ReplyCourier
from spatialthinker_ros.ros.stats import StatsPublisher
from spatialthinker_ros.ros.throttle import ThrottledWarnings
from spatialthinker_ros.srv import AskSpatial

ACTIVATE_WAIT_S = 5.0          # activating waits this long for a running generation, then fails (callbacks wait)
SHUTDOWN_WAIT_S = 5.0          # ...but not when the process exits: its memory goes with it (launch escalates at 5 s)
REQUEST_QUEUE_DEPTH = 1000     # requests (all callers together) that may arrive faster than they are taken


class SpatialThinkerNode(LifecycleNode):
    def __init__(self, **kwargs):
        super().__init__("spatialthinker", **kwargs)
        self.add_on_set_parameters_callback(check_parameters)
        for spec in PARAMETERS:
            self.declare_parameter(spec.name, spec.default, descriptor(spec))
        # One thread runs every callback, but a request coroutine holds its callback group while it awaits the
        # model: with the default mutually exclusive group, nothing else (frames, other requests, results
        # coming back) could run meanwhile. A reentrant group lets them interleave on that thread.
        self._group = ReentrantCallbackGroup()
        self._handoff = ExecutorHandoff(self, self._group)   # worker threads -> the executor thread
        self._warn_throttled = ThrottledWarnings(self.get_logger())
        self._state = "unconfigured"   # rclpy offers no public query of a LifecycleNode's own state
        self.requests_in_progress = 0                             # accepted and not yet answered
        self._runtime = BackendRuntime(self.get_logger())     # the backend and its scheduler
        self._tickets: dict[str, Ticket] = {}                # request id -> ticket, while queued or running
        self._cancelled: set[str] = set()                  # action goals cancelled while their request runs
        self._cameras: dict[str, CameraInput] = {}
        self._camera_subscriptions = []
        self._outputs: Optional[AnswerOutputs] = None
        self._pipeline = PipelineConfig()
        self._setup: Optional[CalibrationSetup] = None   # the loaded backend's (config.answering_setup)
        self._setup_problem = ""                          # why there is none while a backend is loaded
        self._active = False
        self._stats = StatsPublisher(self)
        # Requests wait in this history until the executor takes them: the default depth of 10 silently drops
        # bursts of concurrent calls (their callers wait forever). KEEP_ALL would drop none, but a caller that
        # never reads its responses then fills the response writer's history until send_response raises, which
        # stops the node; KEEP_LAST never blocks. Callers need a depth of at least their own concurrent calls.
        requests_qos = QoSProfile(depth=REQUEST_QUEUE_DEPTH)
        # A reply the transport drops because the caller asked before its reply reader was matched is sent again
        self.replies = ReplyCourier(self, self._group, on_change=self._publish_stats)
        self.create_service(AskSpatial, "~/ask", self._on_ask_service, qos_profile=requests_qos,
                            callback_group=self._group)
        self._action_server = ActionServer(
            self, AskSpatialAction, "~/ask_action", self._on_ask_goal,
            goal_callback=lambda goal: GoalResponse.ACCEPT,
            cancel_callback=self._on_cancel,
            goal_service_qos_profile=requests_qos, result_service_qos_profile=requests_qos,
            cancel_service_qos_profile=requests_qos,
            result_timeout=60, callback_group=self._group)
        self.replies.guard_all()   # ~/ask and rclpy's parameter and lifecycle services

    @property
    def cameras(self) -> Mapping[str, CameraInput]:
        """The configured cameras by name, read-only (their frame counters are what ~/stats reports)."""
        return types.MappingProxyType(self._cameras)

    def _param(self, name: str):
        return self.get_parameter(name).value

    # ---------------------------------------------------------------- lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        p = self._param
        values = {spec.name: p(spec.name) for spec in PARAMETERS}
        try:   # the calibration file before the model loads: a bad one fails in milliseconds
            calibration = read_calibration_file(p("calibration_file"))
            pipeline = pipeline_config_from(values, lift=lift_config_from(values), calibration=calibration)
            backend = self._runtime.load(p("backend"), backend_settings(p("backend"), values))
        except (CalibrationError, BackendError, ValueError, OSError) as exc:
            self.get_logger().error(f"cannot configure: {exc}")
            return TransitionCallbackReturn.FAILURE
        try:   # what the loaded model is (weights, dtype, ...): the setup a calibration must have been made with
            self._setup, self._setup_problem = answering_setup(backend, values), ""
            check_setup(calibration, p("calibration_file"), self._setup)
        except (CalibrationError, BackendError, ValueError, OSError) as exc:
            if calibration is not None:
                self.get_logger().error(f"cannot configure: {exc}")
                self._runtime.close()
                self._setup = None
                self._publish_stats()
                return TransitionCallbackReturn.FAILURE
            self._setup, self._setup_problem = None, str(exc)   # ~/stats says why; nothing depends on it here
        self._pipeline = pipeline.for_backend(backend)
        self._publish_stats()
        transport = "image/compressed" if p("image_transport") == "compressed" else "image"
        for name in p("cameras"):
            topic = self.resolve_topic_name(f"{topic_prefix(name)}{transport}")
            self._cameras[name] = CameraInput(name, topic, self._pipeline.max_request_image_pixels)
        self._outputs = AnswerOutputs(self)
        self._state = "inactive"
        return super().on_configure(state)

    def _subscribe_cameras(self) -> None:
        qos = camera_qos(self._param("image_reliability"))
        for camera in self._cameras.values():
            self._camera_subscriptions += camera.subscribe(
                self, qos, self._param("use_depth"), self._group, self._warn_throttled, self._now,
                lambda: self._param("max_image_age"))

    def _unsubscribe_cameras(self) -> None:
        for subscription in self._camera_subscriptions:
            self.destroy_subscription(subscription)
        self._camera_subscriptions.clear()
        for camera in self._cameras.values():
            camera.forget_frames()

    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        # A second worker must never run on a backend that is still inside generate(): activation fails, the
        # node stays inactive, and activating again once that generation ends works.
        if not self._runtime.start(self._param("queue_size"), wait_s=ACTIVATE_WAIT_S):
            self.get_logger().error("cannot activate: the backend is still generating the answer to a request "
                                    "taken before the last deactivation; activate again once it has finished")
            return TransitionCallbackReturn.FAILURE
        self._subscribe_cameras()
        self._active = True
        self._state = "active"
        self.get_logger().info("active: answering on ~/ask and ~/ask_action")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.stop_answering("node deactivated")
        self._unsubscribe_cameras()
        self._state = "inactive"
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._unsubscribe_cameras()
        self._cameras.clear()
        if self._outputs is not None:
            self._outputs.destroy()
            self._outputs = None
        if self._runtime.close():
            self._publish_stats()
        self._state = "unconfigured"
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.close()
        self._state = "finalized"
        return super().on_shutdown(state)

    def close(self, wait_s: float = SHUTDOWN_WAIT_S) -> None:
        """Answer pending callers and free the model. Safe to call more than once.

        A generation still running after `wait_s` is left to finish on its own (it cannot be interrupted) and
        the model is then not closed: this is for exiting, when the process's memory goes with it."""
        self.stop_answering("node shutting down")
        if self._runtime.close(wait_s):
            self._publish_stats()

    def stop_answering(self, reason: str) -> None:
        """Refuse new requests and answer every pending one (ERROR_NOT_ACTIVE) now; never blocks for long."""
        self._active = False
        if self._runtime.stop(reason):
            self._publish_stats()

    def lifecycle_state(self) -> str:
        """The primary state (unconfigured, inactive, active, finalized), as the on_* callbacks left it."""
        return self._state

    # ---------------------------------------------------------------- requests
    async def _on_ask_service(self, request: AskSpatial.Request, response: AskSpatial.Response):
        outcome = await self._answer(request, uuid.uuid4().hex[:16], feedback=None)
        self._publish_stats()
        return fill_response(response, outcome)

    async def _on_ask_goal(self, goal_handle):
        request_id = bytes(goal_handle.goal_id.uuid).hex()
        outcome = await self._answer(goal_handle.request, request_id, goal_feedback(goal_handle))
        self._publish_stats()
        result = fill_response(AskSpatialAction.Result(), outcome)
        if goal_handle.is_cancel_requested:
            goal_handle.canceled()
        elif result.success:
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return result

    def _publish_stats(self) -> None:
        runtime = self._runtime
        self._stats.publish(runtime.stats(), self._cameras, self.replies.counts(), runtime.state, runtime.model_name,
                            self._pipeline.calibration, self._setup if runtime.state == "loaded" else None,
                            self._setup_problem)

    def _on_cancel(self, goal_handle) -> CancelResponse:
        request_id = bytes(goal_handle.goal_id.uuid).hex()
        self._cancelled.add(request_id)   # also between two tries, when no ticket is queued
        ticket = self._tickets.get(request_id)
        if ticket is not None:
            ticket.cancel()      # frees the queue place; a running generation finishes but is discarded
        return CancelResponse.ACCEPT

    async def _answer(self, request, request_id: str, feedback) -> SpatialAnswer | RequestError:
        """Translate the message, submit, publish; every rule applied on the way is the core's (core/ask.py,
        core/sources.py). Every path returns an answer or a RequestError."""
        self.requests_in_progress += 1
        try:
            if not self._active or self._runtime.scheduler is None:
                raise RequestError(f"node is not active (state: {self.lifecycle_state()})", ErrorCode.NOT_ACTIVE)
            options = list(request.options)
            asked = check_question(request.question, options, self._pipeline.prompt)   # before frames are converted
            source = self._source(request)
            partial_graph = lambda text: scene_graph_msg(flow.partial_scene(text).parsed.scene, source.header)
            sink = FeedbackSink(feedback, self._handoff.post, partial_graph) if feedback else None

            def retrying(smaller: InferenceRequest) -> None:
                self.get_logger().warning(f"request {request_id}: out of memory, retrying with a smaller image")
                if sink is not None:
                    sink.reset()

            flow = AskFlow(source, request.question, options, self._request_config(), scene_only=request.scene_only,
                           request_id=request_id, asked=asked, on_text=sink, on_retry=retrying)
            if feedback:
                feedback(AskSpatialAction.Feedback.STAGE_QUEUED, 0, None)
            while flow.pending:
                flow.record(await self._run(flow.request, feedback))
            result = flow.finish(self._param("backend"))
            answer = spatial_answer_msg(result, source.header, request_id, source.camera, request.question, options)
            self._publish(answer, result, source)
            return answer
        except RequestError as failure:
            if failure.code not in (ErrorCode.BUSY, ErrorCode.NOT_ACTIVE):   # throttled: callers control the rate
                self._warn_throttled(f"request/{failure.code.value}", f"request {request_id} failed: {failure}")
            return failure
        except Exception as exc:   # a bug must still answer the caller, and never stop the node
            self.get_logger().error(f"request {request_id}: unexpected {type(exc).__name__}: {excerpt(exc, 2000)}")
            return internal_error(exc)
        finally:
            self._cancelled.discard(request_id)
            self.requests_in_progress -= 1

    async def _run(self, attempt: InferenceRequest, feedback) -> InferenceResult | BackendError:
        """Queue the request and wait for the worker, without blocking the executor. The scheduler's refusals
        (busy, stopped, timed out, cancelled) are RequestErrors and pass up; a backend's failure is returned."""
        scheduler = self._runtime.scheduler
        if scheduler is None:
            raise RequestError("node is not active", ErrorCode.NOT_ACTIVE)
        if attempt.request_id in self._cancelled:   # cancelled after the first try ended: no second one
            raise RequestCancelled("request cancelled between its two tries")
        on_start = None
        if feedback:
            generating = lambda: feedback(AskSpatialAction.Feedback.STAGE_GENERATING, 0, None)
            on_start = lambda: self._handoff.post(generating)
        ticket = scheduler.submit(attempt, timeout_s=self._param("request_timeout"), on_start=on_start)
        self._tickets[attempt.request_id] = ticket
        worker_future: concurrent.futures.Future = await self._handoff.done(ticket.future)
        del self._tickets[attempt.request_id]
        try:
            return worker_future.result()
        except BackendError as exc:
            return exc

    def _request_config(self) -> PipelineConfig:
        """The configured pipeline with the relation-check parameters read now (they apply to the next request)."""
        checks = dataclasses.replace(self._pipeline.relations, enabled=self._param("check_relations"),
                                     margin_m=self._param("relation_margin"))
        return dataclasses.replace(self._pipeline, relations=checks)

    def _source(self, request) -> Source:
        """The request's own image, else the frame of the camera it names (core/sources.py decides which)."""
        p = self._param
        if has_request_image(request.image):
            return request_source(request.image, self._pipeline.max_request_image_pixels)
        camera = self._cameras[choose_camera(request.camera, list(self._cameras))]
        settings = SourceSettings(use_depth=p("use_depth"), max_image_age=p("max_image_age"),
                                  depth_sync_tolerance=p("depth_sync_tolerance"), depth_scale=p("depth_scale"),
                                  max_request_image_pixels=self._pipeline.max_request_image_pixels)
        return camera_source(camera, self._now(), request.max_image_age, settings, self._warn_throttled)

    def _publish(self, answer: SpatialAnswer, result: SpatialResult, source: Source) -> None:
        p = self._param
        if self._outputs is not None:
            self._outputs.publish(answer, result, source, p("marker_lifetime") if p("publish_markers") else None,
                                  p("publish_debug_image"))
