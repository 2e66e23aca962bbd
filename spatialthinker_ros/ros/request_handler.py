"""The node's requests: ~/ask and ~/ask_action in, one answer or one error out for each.

Each request is a coroutine on the executor thread: it translates the message, submits to the scheduler, waits for
the worker without blocking camera callbacks or other requests, and publishes. Every rule applied on the way is the
core's (core/ask.py, core/sources.py).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import uuid
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Optional

import numpy as np

from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import CallbackGroup
from rclpy.node import Node
from rclpy.qos import QoSProfile

from spatialthinker_ros.action import AskSpatial as AskSpatialAction
from spatialthinker_ros.core.ask import AskFlow
from spatialthinker_ros.core.pipeline import PipelineConfig
from spatialthinker_ros.core.request import ErrorCode, RequestError, check_question, check_request_id, internal_error
from spatialthinker_ros.core.runtime import BackendRuntime
from spatialthinker_ros.core.scheduling import RequestCancelled, Ticket
from spatialthinker_ros.core.sources import (Source, SourceSettings, camera_source, choose_camera, has_request_image,
                                             request_source)
from spatialthinker_ros.core.text import excerpt
from spatialthinker_ros.core.types import BackendError, InferenceRequest, InferenceResult, SpatialResult
from spatialthinker_ros.msg import SpatialAnswer
from spatialthinker_ros.ros.camera_inputs import CameraInput
from spatialthinker_ros.ros.conversions import fill_response, scene_graph_msg, spatial_answer_msg
from spatialthinker_ros.ros.feedback import FeedbackSink, goal_feedback
from spatialthinker_ros.ros.handoff import ExecutorHandoff
from spatialthinker_ros.ros.outputs import AnswerOutputs
from spatialthinker_ros.ros.throttle import ThrottledWarnings
from spatialthinker_ros.srv import AskSpatial, CancelAsk

REQUEST_QUEUE_DEPTH = 1000  # requests (all callers together) that may arrive faster than they are taken
# Failures logged at debug level only, the caller being told: busy and not active follow the callers' own rate, and
# "no frame yet" is what a caller sees while a camera starts (a frame that cannot be decoded is warned where it is
# dropped: core/sources.py)
_TOLD_THE_CALLER_ONLY = (ErrorCode.BUSY, ErrorCode.NOT_ACTIVE, ErrorCode.NO_IMAGE)


class Reply(NamedTuple):
    """What one request gets: its answer or error, and the RGB image it is about when return_image asked for it."""

    outcome: SpatialAnswer | RequestError
    frame: Optional[np.ndarray] = None


@dataclass(frozen=True)
class Configured:
    """What configure set up, read by every request until cleanup."""

    pipeline: PipelineConfig
    cameras: Mapping[str, CameraInput]
    outputs: AnswerOutputs
    backend: str          # the loaded backend's name, which its errors carry
    depth_scale: float    # metres per unit of 16UC1 depth


class RequestHandler:
    """Answers the node's service and action. Whether a request is taken is the runtime's scheduler alone."""

    def __init__(self, node: Node, runtime: BackendRuntime, handoff: ExecutorHandoff, warn: ThrottledWarnings,
                 lifecycle_state: Callable[[], str], on_answered: Callable[[], None]):
        self._node = node
        self._runtime = runtime
        self._handoff = handoff
        self._warn_throttled = warn
        self._lifecycle_state = lifecycle_state
        self._on_answered = on_answered
        self.configured: Optional[Configured] = None   # set by configure, None again after cleanup
        self._requests: set[str] = set()                # ids of the requests taken and not yet answered
        self._tickets: dict[str, Ticket] = {}          # request id -> ticket, while queued or running
        self._cancelled: set[str] = set()               # requests cancelled while in progress
        self._named: set[str] = set()                   # ~/ask requests in progress under their caller's id
        self._action_server: Optional[ActionServer] = None   # offered by serve()

    def serve(self, group: CallbackGroup) -> None:
        """Offer ~/ask and ~/ask_action on the node, their callbacks in `group` (reentrant: a request awaiting the
        model must not hold up frames, other requests or results coming back)."""
        # Requests wait in this history until the executor takes them: the default depth of 10 silently drops
        # bursts of concurrent calls (their callers wait forever). KEEP_ALL would drop none, but a caller that never
        # reads its responses then fills the reply writer's history until send_response raises, stopping the node.
        qos = QoSProfile(depth=REQUEST_QUEUE_DEPTH)
        self._node.create_service(AskSpatial, "~/ask", self.on_ask_service, qos_profile=qos, callback_group=group)
        self._node.create_service(CancelAsk, "~/cancel", self.on_cancel_service, qos_profile=qos,
                                  callback_group=group)
        self._action_server = ActionServer(
            self._node, AskSpatialAction, "~/ask_action", self.on_ask_goal,
            goal_callback=lambda goal: GoalResponse.ACCEPT, cancel_callback=self.on_cancel,
            goal_service_qos_profile=qos, result_service_qos_profile=qos, cancel_service_qos_profile=qos,
            result_timeout=60, callback_group=group)

    def _param(self, name: str):
        return self._node.get_parameter(name).value

    @property
    def in_progress(self) -> int:
        """Requests taken and not yet answered."""
        return len(self._requests)

    async def on_ask_service(self, request: AskSpatial.Request, response: AskSpatial.Response):
        try:
            request_id = (check_request_id(request.request_id, self._requests) if request.request_id
                          else uuid.uuid4().hex[:16])
        except RequestError as failure:
            reply = Reply(failure)
        else:
            if request.request_id:
                self._named.add(request_id)
            try:
                reply = await self._answer(request, request_id, feedback=None)
            finally:
                self._named.discard(request_id)
        self._on_answered()
        return fill_response(response, *reply)

    def on_cancel_service(self, request: CancelAsk.Request, response: CancelAsk.Response):
        """Only ids their callers chose: a goal is cancelled through the action, which ends it as cancelled."""
        response.cancelled = request.request_id in self._named and self._cancel(request.request_id)
        return response

    async def on_ask_goal(self, goal_handle):
        request_id = bytes(goal_handle.goal_id.uuid).hex()
        reply = await self._answer(goal_handle.request, request_id, goal_feedback(goal_handle))
        self._on_answered()
        result = fill_response(AskSpatialAction.Result(), *reply)
        if goal_handle.is_cancel_requested:
            goal_handle.canceled()
        elif result.success:
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return result

    def on_cancel(self, goal_handle) -> CancelResponse:
        self._cancel(bytes(goal_handle.goal_id.uuid).hex())
        return CancelResponse.ACCEPT

    def _cancel(self, request_id: str) -> bool:
        """Cancel a request in progress (False: none has this id). Its caller gets ERROR_CANCELLED."""
        if request_id not in self._requests:
            return False
        self._cancelled.add(request_id)   # also before its first try and between two tries, when no ticket is queued
        ticket = self._tickets.get(request_id)
        if ticket is not None:
            ticket.cancel()      # frees the queue place; a running generation finishes but is discarded
        return True

    async def _answer(self, request, request_id: str, feedback) -> Reply:
        """Translate the message, submit, publish. Every path returns an answer or a RequestError."""
        self._requests.add(request_id)
        try:
            configured = self.configured
            if self._runtime.scheduler is None or configured is None:
                raise RequestError(f"node is not active (state: {self._lifecycle_state()})", ErrorCode.NOT_ACTIVE)
            options = list(request.options)
            asked = check_question(request.question, options, configured.pipeline.prompt)   # before frames convert
            source = self._source(request, configured)
            partial_graph = lambda text: scene_graph_msg(flow.partial_scene(text).parsed.scene, source.header)
            sink = FeedbackSink(feedback, self._handoff.post, partial_graph) if feedback else None

            def retrying(smaller: InferenceRequest) -> None:
                self._node.get_logger().warning(f"request {request_id}: out of memory, retrying with a smaller image")
                if sink is not None:
                    sink.reset()

            flow = AskFlow(source, request.question, options, self._request_config(configured.pipeline),
                           scene_only=request.scene_only, request_id=request_id, asked=asked, on_text=sink,
                           on_retry=retrying)
            if feedback:
                feedback(AskSpatialAction.Feedback.STAGE_QUEUED, 0, None)
            while flow.pending:
                flow.record(await self._run(flow.request, feedback))
            result = flow.finish(configured.backend)
            answer = spatial_answer_msg(result, source.header, request_id, source.camera, request.question, options)
            self._publish(configured.outputs, answer, result, source)
            return Reply(answer, source.rgb if request.return_image else None)
        except RequestError as failure:
            if failure.code in _TOLD_THE_CALLER_ONLY:
                self._node.get_logger().debug(f"request {request_id} failed: {failure}")
            else:   # throttled: callers control the rate
                self._warn_throttled(f"request/{failure.code.value}", f"request {request_id} failed: {failure}")
            return Reply(failure)
        except Exception as exc:   # a bug must still answer the caller, and never stop the node
            self._node.get_logger().error(
                f"request {request_id}: unexpected {type(exc).__name__}: {excerpt(exc, 2000)}")
            return Reply(internal_error(exc))
        finally:
            self._cancelled.discard(request_id)
            self._requests.discard(request_id)

    async def _run(self, attempt: InferenceRequest, feedback) -> InferenceResult | BackendError:
        """Queue the request and wait for the worker, without blocking the executor. The scheduler's refusals
        (busy, stopped, timed out, cancelled) are RequestErrors and pass up; a backend's failure is returned."""
        scheduler = self._runtime.scheduler
        if scheduler is None:
            raise RequestError("node is not active", ErrorCode.NOT_ACTIVE)
        if attempt.request_id in self._cancelled:   # before its first try, or after the first ended: no (next) try
            raise RequestCancelled("request cancelled")
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

    def _request_config(self, pipeline: PipelineConfig) -> PipelineConfig:
        """The configured pipeline with the relation-check parameters read now (they apply to the next request)."""
        checks = dataclasses.replace(pipeline.relations, enabled=self._param("check_relations"),
                                     margin_m=self._param("relation_margin"))
        return dataclasses.replace(pipeline, relations=checks)

    def _source(self, request, configured: Configured) -> Source:
        """The request's own image, else the frame of the camera it names (core/sources.py decides which)."""
        max_pixels = configured.pipeline.max_request_image_pixels
        if has_request_image(request.image):
            return request_source(request.image, max_pixels)
        camera = configured.cameras[choose_camera(request.camera, list(configured.cameras))]
        settings = SourceSettings(use_depth=camera.with_depth, max_image_age=self._param("max_image_age"),
                                  depth_sync_tolerance=self._param("depth_sync_tolerance"),
                                  depth_scale=configured.depth_scale, max_request_image_pixels=max_pixels)
        return camera_source(camera, self._node.get_clock().now().nanoseconds * 1e-9, request.max_image_age,
                             settings, self._warn_throttled)

    def _publish(self, outputs: AnswerOutputs, answer: SpatialAnswer, result: SpatialResult, source: Source) -> None:
        p = self._param
        outputs.publish(answer, result, source, p("marker_lifetime") if p("publish_markers") else None,
                        p("publish_debug_image"))
