"""spatialthinker_node: camera frames + questions in; answers, scene graphs and RViz markers out.

Threads: one SingleThreadedExecutor thread runs every ROS callback (camera subscriptions only keep the
latest message, so an idle node costs about what a bare subscriber does), and the scheduler's worker thread
runs the model. Requests are coroutines on the executor: they wait for the worker without blocking camera
callbacks or other requests. The worker hands results back through a guard condition, so rclpy objects
are only ever touched from the executor thread.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import gc
import math
import signal
import threading
import time
import types
import uuid
from typing import Callable, Mapping, Optional

import rclpy
import rclpy.logging
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from rclpy.task import Future
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header
from visualization_msgs.msg import MarkerArray

from spatialthinker_ros.action import AskSpatial as AskSpatialAction
from spatialthinker_ros.core.annotate import draw_scene
from spatialthinker_ros.core.backends import create_backend
from spatialthinker_ros.core.backends.settings import backend_settings
from spatialthinker_ros.core.geometry import CameraIntrinsics, DepthImage
from spatialthinker_ros.core.parsing import scene_text_complete
from spatialthinker_ros.core.pipeline import PipelineConfig, finish_result, prepare_request, smaller_request
from spatialthinker_ros.core.prompt import PromptConfig
from spatialthinker_ros.core.request import (ErrorCode, ImageError, RequestError, answered, check_frame_id,
                                             check_image_age, check_question, depth_aspect_mismatch, internal_error,
                                             max_image_age, request_image_error)
from spatialthinker_ros.core.scheduling import RequestScheduler, Ticket
from spatialthinker_ros.core.text import excerpt
from spatialthinker_ros.core.types import BackendError, InferenceRequest, InferenceResult, SpatialResult
from spatialthinker_ros.msg import SceneGraph, SpatialAnswer
from spatialthinker_ros.ros.cameras import CameraInput, Frame, keep_freed_frame_memory, topic_prefix
from spatialthinker_ros.ros.conversions import (compressed_to_rgb, depth_image, fill_response, image_to_rgb,
                                                rgb_to_image_msg, scene_graph_msg, spatial_answer_msg)
from spatialthinker_ros.ros.parameters import PARAMETERS, check_parameters, descriptor
from spatialthinker_ros.ros.replies import ReplyCourier
from spatialthinker_ros.ros.stats import StatsPublisher
from spatialthinker_ros.ros.visualization import scene_markers
from spatialthinker_ros.srv import AskSpatial

FEEDBACK_EVERY_TOKENS = 16
WARN_THROTTLE_S = 5.0
BACKEND_IDLE_WAIT_S = 600.0    # a generation that is already running cannot be interrupted; wait for it
ACTIVATE_WAIT_S = 5.0          # activating waits this long for it, then fails (callbacks wait meanwhile)
SHUTDOWN_WAIT_S = 5.0          # ...but not when the process exits: its memory goes with it (launch escalates at 5 s)
SHUTDOWN_DRAIN_S = 2.0         # on SIGINT/SIGTERM, time for the answers to pending callers to go out
SPIN_PERIOD_S = 0.1            # the executor wakes at least this often, so a signal is seen promptly
REQUEST_QUEUE_DEPTH = 1000     # requests (all callers together) that may arrive faster than they are taken


@dataclasses.dataclass
class Source:
    """The frame a request is answered on, converted, with the depth paired to it."""

    rgb: object
    header: Header
    camera: str
    depth: Optional[DepthImage] = None
    intrinsics: Optional[CameraIntrinsics] = None


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
        self._posted: collections.deque[Callable[[], None]] = collections.deque()
        self._wake = self.create_guard_condition(self._run_posted, callback_group=self._group)
        self._last_warning: dict[str, tuple[float, int]] = {}   # key -> (last logged, suppressed since)
        self.requests_in_progress = 0                             # accepted and not yet answered
        self._backend = None
        self._scheduler: Optional[RequestScheduler] = None
        self._draining: Optional[RequestScheduler] = None   # stopped, but its worker may still be generating
        self._tickets: dict[str, Ticket] = {}                # request id -> ticket, while queued or running
        self._cameras: dict[str, CameraInput] = {}
        self._camera_subscriptions = []
        self._outputs: dict[str, object] = {}
        self._pipeline = PipelineConfig()
        self._active = False
        self._stats = StatsPublisher(self)
        # Requests wait in this history until the executor takes them: the default depth of 10 silently drops
        # bursts of concurrent calls (their callers wait forever). KEEP_ALL would drop none, but a caller that
        # never reads its responses then fills the response writer's history until send_response raises, which
        # stops the node; KEEP_LAST never blocks. Callers need a depth of at least their own concurrent calls.
        requests_qos = QoSProfile(depth=REQUEST_QUEUE_DEPTH)
        # A reply the transport drops because the caller asked before its reply reader was matched is sent again
        self.replies = ReplyCourier(self, self._group)
        self.replies.guard(self.create_service(AskSpatial, "~/ask", self._on_ask_service, qos_profile=requests_qos,
                                               callback_group=self._group))
        self._action_server = ActionServer(
            self, AskSpatialAction, "~/ask_action", self._on_ask_goal,
            goal_callback=lambda goal: GoalResponse.ACCEPT,
            cancel_callback=self._on_cancel,
            goal_service_qos_profile=requests_qos, result_service_qos_profile=requests_qos,
            cancel_service_qos_profile=requests_qos,
            result_timeout=60, callback_group=self._group)

    # ---------------------------------------------------------------- thread hand-off
    def _post(self, call: Callable[[], None]) -> None:
        """Run `call` on the executor thread (safe from any thread)."""
        self._posted.append(call)
        self._wake.trigger()

    def _run_posted(self) -> None:
        while self._posted:
            self._posted.popleft()()

    def _warn_throttled(self, key: str, message: str) -> None:
        """At most one warning per key every WARN_THROTTLE_S, saying how many like it were left out."""
        now = time.monotonic()
        last, suppressed = self._last_warning.get(key, (-math.inf, 0))
        if now - last >= WARN_THROTTLE_S:
            self._last_warning[key] = (now, 0)
            more = f" (and {suppressed} more like it since the last report)" if suppressed else ""
            self.get_logger().warning(message + more)
        else:
            self._last_warning[key] = (last, suppressed + 1)

    @property
    def cameras(self) -> Mapping[str, CameraInput]:
        """The configured cameras by name, read-only (their frame counters are what ~/stats reports)."""
        return types.MappingProxyType(self._cameras)

    def _param(self, name: str):
        return self.get_parameter(name).value

    # ---------------------------------------------------------------- lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        p = self._param
        backend = p("backend")
        settings = backend_settings(backend, {spec.name: p(spec.name) for spec in PARAMETERS})
        self.get_logger().info(f"loading backend {backend} ({settings.get('model', settings.get('replay_file'))})")
        started = time.monotonic()
        try:
            self._backend = create_backend(backend, **settings)
        except (BackendError, ValueError, OSError) as exc:
            self.get_logger().error(f"cannot configure: {exc}")
            return TransitionCallbackReturn.FAILURE
        self._pipeline = PipelineConfig(
            prompt=PromptConfig(style=p("prompt_style"), max_question_chars=p("max_question_chars")),
            max_input_pixels=p("max_input_pixels"),
            max_request_image_pixels=p("max_request_image_pixels")).for_backend(self._backend)
        self.get_logger().info(f"backend ready in {time.monotonic() - started:.1f} s: model {self._backend.model_name}")
        self._create_camera_inputs()
        reliable = QoSProfile(depth=10)
        self._outputs = {
            "answer": self.create_lifecycle_publisher(SpatialAnswer, "~/answer", reliable),
            "scene_graph": self.create_lifecycle_publisher(SceneGraph, "~/scene_graph", reliable),
            "markers": self.create_lifecycle_publisher(MarkerArray, "~/markers", reliable),
            "debug_image": self.create_lifecycle_publisher(Image, "~/debug_image", QoSProfile(depth=2)),
        }
        return super().on_configure(state)

    def _create_camera_inputs(self) -> None:
        p = self._param
        # Depth 1: only the latest frame matters. Best effort is what camera drivers publish (sensor data QoS);
        # a reliable subscriber would receive nothing from them.
        reliability = (ReliabilityPolicy.BEST_EFFORT if p("image_reliability") == "best_effort"
                       else ReliabilityPolicy.RELIABLE)
        qos = QoSProfile(depth=1, reliability=reliability, history=HistoryPolicy.KEEP_LAST)
        for name in p("cameras"):
            camera = CameraInput(name, self._pipeline.max_request_image_pixels)
            self._cameras[name] = camera
            prefix = topic_prefix(name)
            if p("image_transport") == "compressed":
                self._camera_subscriptions.append(self.create_subscription(
                    CompressedImage, f"{prefix}image/compressed", self._colour_callback(camera), qos, callback_group=self._group))
            else:
                self._camera_subscriptions.append(self.create_subscription(
                    Image, f"{prefix}image", self._colour_callback(camera), qos, callback_group=self._group))
            if p("use_depth"):
                self._camera_subscriptions.append(self.create_subscription(
                    Image, f"{prefix}depth", self._depth_callback(camera), qos, callback_group=self._group))
                self._camera_subscriptions.append(self.create_subscription(
                    CameraInfo, f"{prefix}camera_info", self._info_callback(camera), qos, callback_group=self._group))

    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _colour_callback(self, camera: CameraInput):
        def callback(msg) -> None:
            reason = camera.offer_colour(msg, self._now(), self._param("max_image_age"))
            if reason:
                self._warn_throttled(f"colour/{camera.name}", f"camera '{camera.name}': frame dropped: {reason}")
        return callback

    def _depth_callback(self, camera: CameraInput):
        def callback(msg: Image) -> None:
            reason = camera.offer_depth(msg, self._now())
            if reason:
                self._warn_throttled(f"depth/{camera.name}", f"camera '{camera.name}': depth dropped: {reason}")
        return callback

    def _info_callback(self, camera: CameraInput):
        def callback(msg: CameraInfo) -> None:
            reason = camera.offer_info(msg)
            if reason:
                self._warn_throttled(f"info/{camera.name}", f"camera '{camera.name}': CameraInfo ignored: {reason}")
        return callback

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        # A second worker must never run on a backend that is still inside generate(): activation fails, the
        # node stays inactive, and activating again once that generation ends works.
        if not self._wait_backend_idle(ACTIVATE_WAIT_S):
            self.get_logger().error("cannot activate: the backend is still generating the answer to a request "
                                    "taken before the last deactivation; activate again once it has finished")
            return TransitionCallbackReturn.FAILURE
        self._scheduler = RequestScheduler(self._backend, queue_size=self._param("queue_size"))
        self._active = True
        self.get_logger().info("active: answering on ~/ask and ~/ask_action")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.stop_answering("node deactivated")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_inputs_outputs()
        self._close_backend()
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.close()
        return super().on_shutdown(state)

    def close(self, wait_s: float = SHUTDOWN_WAIT_S) -> None:
        """Answer pending callers and free the model. Safe to call more than once.

        A generation still running after `wait_s` is left to finish on its own (it cannot be interrupted) and
        the model is then not closed: this is for exiting, when the process's memory goes with it."""
        self.stop_answering("node shutting down")
        self._close_backend(wait_s)

    def stop_answering(self, reason: str) -> None:
        """Refuse new requests and answer every pending one (ERROR_NOT_ACTIVE) now; never blocks for long."""
        self._active = False
        if self._scheduler is not None:
            # Every caller is answered at once; only an idle worker is waited for (briefly): the answers go out
            # from this thread, so waiting here for a running generation would hold them back.
            if not self._scheduler.stop(reason, timeout_s=0.1):
                self._draining = self._scheduler
            self.get_logger().info(f"stopped answering ({reason}): {self._scheduler.stats()}")
            self._stats.publish(self._scheduler.stats(), self._cameras)
            self._scheduler = None

    def _wait_backend_idle(self, timeout_s: float = BACKEND_IDLE_WAIT_S) -> bool:
        """Before the backend is closed or reused: let a generation that was already running finish.
        Returns whether the backend is idle."""
        if self._draining is not None:
            self.get_logger().info("waiting for the running generation to finish")
            if not self._draining.stop("node deactivated", timeout_s=timeout_s):
                self.get_logger().error(f"generation still running after {timeout_s:.0f} s")
                return False
            self._draining = None
        return True

    def _release_inputs_outputs(self) -> None:
        for subscription in self._camera_subscriptions:
            self.destroy_subscription(subscription)
        self._camera_subscriptions.clear()
        self._cameras.clear()
        for publisher in self._outputs.values():
            self.destroy_lifecycle_publisher(publisher)
        self._outputs.clear()

    def _close_backend(self, wait_s: float = BACKEND_IDLE_WAIT_S) -> None:
        """Free the model, GPU memory included (TransformersBackend.close empties the CUDA cache)."""
        if not self._wait_backend_idle(wait_s):
            self.get_logger().warning("backend left open: a generation is still running")
            return
        if self._backend is not None:
            self._backend.close()
            self._backend = None
            gc.collect()
            self.get_logger().info("backend closed: model and its memory released")

    def lifecycle_state(self) -> str:
        return self._state_machine.current_state[1]

    # ---------------------------------------------------------------- requests
    async def _on_ask_service(self, request: AskSpatial.Request, response: AskSpatial.Response):
        outcome = await self._answer(request, uuid.uuid4().hex[:16], feedback=None)
        self._publish_stats()
        return fill_response(response, outcome)

    async def _on_ask_goal(self, goal_handle):
        request_id = bytes(goal_handle.goal_id.uuid).hex()

        def feedback(stage: int, tokens: int, graph: Optional[SceneGraph]) -> None:
            if goal_handle.is_active:
                message = AskSpatialAction.Feedback(stage=stage, tokens_generated=tokens)
                if graph is not None:
                    message.scene_graph = graph
                goal_handle.publish_feedback(message)

        outcome = await self._answer(goal_handle.request, request_id, feedback)
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
        scheduler = self._scheduler or self._draining
        self._stats.publish(scheduler.stats() if scheduler is not None else None, self._cameras)

    def _on_cancel(self, goal_handle) -> CancelResponse:
        ticket = self._tickets.get(bytes(goal_handle.goal_id.uuid).hex())
        if ticket is not None:
            ticket.cancel()      # frees the queue place; a running generation finishes but is discarded
        return CancelResponse.ACCEPT

    async def _answer(self, request, request_id: str, feedback) -> SpatialAnswer | RequestError:
        """Translate the message, submit, publish; every rule applied on the way is core/request.py's. Every path
        returns an answer or a RequestError."""
        self.requests_in_progress += 1
        try:
            if not self._active or self._scheduler is None:
                raise RequestError(f"node is not active (state: {self.lifecycle_state()})", ErrorCode.NOT_ACTIVE)
            options = list(request.options)
            asked = check_question(request.question, options, self._pipeline.prompt)   # before frames are converted
            source = self._source(request)
            attempt = prepare_request(source.rgb, request.question, options, self._pipeline,
                                      scene_only=request.scene_only, request_id=request_id, asked=asked,
                                      on_text=self._feedback_sink(feedback, source, lambda: attempt))
            if feedback:
                feedback(AskSpatialAction.Feedback.STAGE_QUEUED, 0, None)
            outcome = await self._run(attempt, feedback)
            smaller = smaller_request(attempt, source.rgb, self._pipeline, outcome)
            if smaller is not None:
                self.get_logger().warning(f"request {request_id}: out of memory, retrying with a smaller image")
                attempt = smaller
                outcome = await self._run(attempt, feedback)
            result = finish_result(attempt, answered(outcome, self._param("backend")), options,
                                   camera_size=(source.rgb.shape[1], source.rgb.shape[0]),
                                   depth=source.depth, intrinsics=source.intrinsics,
                                   scene_only=request.scene_only, config=self._finishing_config())
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
            self.requests_in_progress -= 1

    def _feedback_sink(self, feedback, source: Source, attempt: Callable[[], InferenceRequest]):
        """The request's on_text for an action goal (None for the service): the scene graph as soon as it is
        complete, then progress every FEEDBACK_EVERY_TOKENS tokens. Runs on the worker thread."""
        if feedback is None:
            return None
        scene_sent = threading.Event()
        progress = {"tokens": -FEEDBACK_EVERY_TOKENS}

        def on_text(text: str, tokens: int) -> None:
            if not scene_sent.is_set() and scene_text_complete(text):
                scene_sent.set()
                self._post(lambda: feedback(AskSpatialAction.Feedback.STAGE_SCENE_READY, tokens,
                                            self._partial_scene(attempt(), text, source)))
            elif tokens - progress["tokens"] >= FEEDBACK_EVERY_TOKENS:
                progress["tokens"] = tokens
                stage = (AskSpatialAction.Feedback.STAGE_SCENE_READY if scene_sent.is_set()
                         else AskSpatialAction.Feedback.STAGE_GENERATING)
                self._post(lambda: feedback(stage, tokens, None))
        return on_text

    async def _run(self, attempt: InferenceRequest, feedback) -> InferenceResult | BackendError:
        """Queue the request and wait for the worker, without blocking the executor. The scheduler's refusals
        (busy, stopped, timed out, cancelled) are RequestErrors and pass up; a backend's failure is returned."""
        scheduler = self._scheduler
        if scheduler is None:
            raise RequestError("node is not active", ErrorCode.NOT_ACTIVE)
        on_start = None
        if feedback:
            on_start = lambda: self._post(lambda: feedback(AskSpatialAction.Feedback.STAGE_GENERATING, 0, None))
        ticket = scheduler.submit(attempt, timeout_s=self._param("request_timeout"), on_start=on_start)
        self._tickets[attempt.request_id] = ticket
        done: Future = Future()
        ticket.future.add_done_callback(lambda f: self._post(lambda: done.set_result(f)))
        await done
        del self._tickets[attempt.request_id]
        worker_future: concurrent.futures.Future = done.result()
        try:
            return worker_future.result()
        except BackendError as exc:
            return exc

    def _finishing_config(self) -> PipelineConfig:
        """The configured pipeline with the relation-check parameters read now (they apply to the next request)."""
        checks = dataclasses.replace(self._pipeline.relations, enabled=self._param("check_relations"),
                                     margin_m=self._param("relation_margin"))
        return dataclasses.replace(self._pipeline, relations=checks)

    def _partial_scene(self, attempt: InferenceRequest, text: str, source: Source) -> SceneGraph:
        result = finish_result(attempt, InferenceResult(text=text), [],
                               camera_size=(source.rgb.shape[1], source.rgb.shape[0]),
                               depth=source.depth, intrinsics=source.intrinsics, scene_only=True,
                               config=self._finishing_config())
        return scene_graph_msg(result.parsed.scene, source.header)

    # ---------------------------------------------------------------- frames
    def _source(self, request) -> Source:
        limit = self._pipeline.max_request_image_pixels
        image = request.image
        # Any field set means the caller meant to send an image: never answer about the camera instead.
        if len(image.data) > 0 or image.width or image.height or image.step or image.encoding:
            check_frame_id(image.header.frame_id)
            try:
                return Source(image_to_rgb(image, limit), image.header, camera="")
            except ImageError as exc:
                raise request_image_error(exc) from None
        names = list(self._cameras)
        name = request.camera or names[0]
        camera = self._cameras.get(name)
        if camera is None:
            raise RequestError(f"unknown camera {excerpt(name)!r}; configured: {', '.join(names)}",
                               ErrorCode.UNKNOWN_CAMERA)
        max_age = max_image_age(request.max_image_age, self._param("max_image_age"))
        now = self._now()
        depth = None
        if self._param("use_depth"):   # an older frame with depth only while it is fresh enough itself
            oldest = now - max_age if max_age > 0 else -math.inf
            frame, depth = camera.newest_paired(self._param("depth_sync_tolerance"), oldest)
        else:
            frame = camera.colour
        if frame is None:
            transport = "image/compressed" if self._param("image_transport") == "compressed" else "image"
            topic = self.resolve_topic_name(f"{topic_prefix(name)}{transport}")
            raise RequestError(f"camera {name!r} has not delivered a frame yet on {topic}", ErrorCode.NO_IMAGE)
        check_image_age(now - frame.time, max_age, name)
        camera.frames_decoded += 1
        try:
            if isinstance(frame.msg, CompressedImage):
                rgb = compressed_to_rgb(frame.msg, limit)
            else:
                rgb = image_to_rgb(frame.msg, limit)
        except ImageError as exc:
            camera.discard(frame)
            self._warn_throttled(f"decode/{name}", f"camera {name!r}: frame dropped: {exc}")
            raise RequestError(f"latest frame of camera {name!r} is unusable: {exc}", ErrorCode.NO_IMAGE) from None
        source = Source(rgb, frame.msg.header, camera=name)
        if depth is not None:
            self._attach_depth(source, camera, depth)
        return source

    def _attach_depth(self, source: Source, camera: CameraInput, depth: Frame) -> None:
        """Depth + CameraInfo with the frame when both fit; otherwise answer without 3D, with a warning."""
        if camera.intrinsics is None:
            return
        colour_size = (source.rgb.shape[1], source.rgb.shape[0])
        mismatch = depth_aspect_mismatch(colour_size, (depth.msg.width, depth.msg.height))
        if mismatch:
            self._warn_throttled(f"aspect/{camera.name}", f"camera {camera.name!r}: {mismatch}: no 3D positions")
            return
        try:
            source.depth = depth_image(depth.msg, self._param("depth_scale"), self._pipeline.max_request_image_pixels)
            source.intrinsics = camera.intrinsics
        except ValueError as exc:
            self._warn_throttled(f"depth/{camera.name}", f"camera {camera.name!r}: depth unusable: {exc}")

    # ---------------------------------------------------------------- outputs
    def _publish(self, answer: SpatialAnswer, result: SpatialResult, source: Source) -> None:
        outputs = self._outputs
        if not outputs:
            return
        outputs["answer"].publish(answer)
        outputs["scene_graph"].publish(answer.scene_graph)
        if self._param("publish_markers"):
            outputs["markers"].publish(scene_markers(result.parsed.scene, source.header,
                                                        self._param("marker_lifetime")))
        debug = outputs["debug_image"]
        if self._param("publish_debug_image") and debug.get_subscription_count() > 0:
            caption = result.parsed.answer or result.parsed.status.name.lower()
            debug.publish(rgb_to_image_msg(draw_scene(source.rgb, result.parsed.scene, caption), source.header))


def main(args=None) -> int:
    """Runs the node until SIGINT or SIGTERM; exits 0 then (1 when the parameters or configure fail).

    rclpy's own signal handlers would shut the ROS context down at once, leaving every caller whose request is
    in flight waiting forever. Here a signal stops the node answering instead: pending callers get
    ERROR_NOT_ACTIVE, their answers go out, and only then does the node leave the graph.
    """
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stopping = threading.Event()
    starting = True

    def on_signal(signum, frame) -> None:
        nonlocal starting
        if starting:                 # e.g. loading the model: stop that at once
            starting = False
            raise KeyboardInterrupt
        stopping.set()               # later signals change nothing: shutting down is bounded anyway

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    node = None
    executor = SingleThreadedExecutor()
    try:
        try:
            node = SpatialThinkerNode()
        except ParameterException as exc:   # the reason, without a traceback
            rclpy.logging.get_logger("spatialthinker").fatal(f"invalid parameter: {exc}")
            return 1
        if node.get_parameter("keep_frame_memory").value:   # before any frame arrives
            node.get_logger().info(keep_freed_frame_memory())
        executor.add_node(node)
        if node.get_parameter("autostart").value:
            if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                node.get_logger().fatal("configure failed; see the error above")
                return 1
            node.trigger_activate()
        starting = False
        while not stopping.is_set():
            executor.spin_once(timeout_sec=SPIN_PERIOD_S)
        node.get_logger().info("signal received: answering pending requests, then shutting down")
        node.stop_answering("node shutting down")
        drain_until = time.monotonic() + SHUTDOWN_DRAIN_S
        while time.monotonic() < drain_until:
            if not node.requests_in_progress:   # action results still take a few callbacks to reach callers
                drain_until = min(drain_until, time.monotonic() + 0.2)
            executor.spin_once(timeout_sec=0.05)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        starting = False
        if node is not None:
            node.close()
            executor.shutdown(timeout_sec=5.0)
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
