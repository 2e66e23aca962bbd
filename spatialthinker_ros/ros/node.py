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
import uuid
from typing import Callable, Optional

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
from spatialthinker_ros.core.backends.base import GenerationConfig
from spatialthinker_ros.core.geometry import CameraIntrinsics, DepthImage
from spatialthinker_ros.core.parsing import scene_text_complete
from spatialthinker_ros.core.pipeline import PipelineConfig, finish_result, prepare_request
from spatialthinker_ros.core.prompt import PromptConfig, build_prompt, option_letter
from spatialthinker_ros.core.scheduling import (QueueFull, RequestCancelled, RequestScheduler, RequestTimeout,
                                                SchedulerStopped, Ticket)
from spatialthinker_ros.core.types import (BackendError, BackendErrorKind, InferenceRequest, InferenceResult,
                                           InvalidRequest, SpatialResult)
from spatialthinker_ros.msg import SceneGraph, SpatialAnswer
from spatialthinker_ros.ros.cameras import CameraInput, Frame, keep_freed_frame_memory, topic_prefix
from spatialthinker_ros.ros.conversions import (ImageError, clip, compressed_to_rgb, depth_image,
                                                image_to_rgb, intrinsics_from_camera_info, rgb_to_image_msg,
                                                scene_graph_msg, spatial_answer_msg)
from spatialthinker_ros.ros.parameters import PARAMETERS, check_parameters, descriptor
from spatialthinker_ros.ros.replies import ReplyCourier
from spatialthinker_ros.ros.visualization import scene_markers
from spatialthinker_ros.srv import AskSpatial

Error = AskSpatial.Response
FEEDBACK_EVERY_TOKENS = 16
WARN_THROTTLE_S = 5.0
OOM_RETRY_SCALE = 0.5          # per side, for the one retry after the backend ran out of memory
OOM_RETRY_MIN_PIXELS = 200_000
ASPECT_TOLERANCE = 0.02        # depth and colour must show the same field of view to be paired
BACKEND_IDLE_WAIT_S = 600.0    # a generation that is already running cannot be interrupted; wait for it
SHUTDOWN_WAIT_S = 5.0          # ...but not when the process exits: its memory goes with it (launch escalates at 5 s)
SHUTDOWN_DRAIN_S = 2.0         # on SIGINT/SIGTERM, time for the answers to pending callers to go out
SPIN_PERIOD_S = 0.1            # the executor wakes at least this often, so a signal is seen promptly
MAX_ASPECT_RATIO = 200         # Qwen2.5-VL's image processor refuses longer images, failing the whole batch
REQUEST_QUEUE_DEPTH = 1000     # requests (all callers together) that may arrive faster than they are taken
MAX_FRAME_ID_CHARS = 256       # a request image's frame_id is copied into every output message


class RequestFailed(Exception):
    """A request that ends with an error code instead of an answer."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


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

    def _param(self, name: str):
        return self.get_parameter(name).value

    # ---------------------------------------------------------------- lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        p = self._param
        self._pipeline = PipelineConfig(
            prompt=PromptConfig(style=p("prompt_style"), max_question_chars=p("max_question_chars")),
            max_input_pixels=p("max_input_pixels"))
        generation = GenerationConfig(max_new_tokens=p("max_new_tokens"))
        backend = p("backend")
        settings = {
            "transformers": dict(model=p("model"), device=p("device"), dtype=p("dtype"),
                                 attn_implementation=p("attn_implementation"), quantization=p("quantization"),
                                 min_pixels=p("min_pixels"), max_pixels=p("max_pixels"),
                                 max_batch_size=p("max_batch_size"), generation=generation),
            "openai": dict(server_url=p("server_url"), model=p("model"), api_key_env=p("api_key_env"),
                           timeout_s=p("server_timeout"), max_concurrency=p("max_batch_size"),
                           generation=generation),
            "replay": dict(replay_file=p("replay_file"), latency_s=p("replay_latency")),
        }[backend]
        self.get_logger().info(f"loading backend {backend} ({settings.get('model', settings.get('replay_file'))})")
        started = time.monotonic()
        try:
            self._backend = create_backend(backend, **settings)
        except (BackendError, ValueError, OSError) as exc:
            self.get_logger().error(f"cannot configure: {exc}")
            return TransitionCallbackReturn.FAILURE
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
            camera = CameraInput(name, p("max_request_image_pixels"))
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
        self._wait_backend_idle()
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
        return self._fill(response, outcome)

    async def _on_ask_goal(self, goal_handle):
        request_id = bytes(goal_handle.goal_id.uuid).hex()

        def feedback(stage: int, tokens: int, graph: Optional[SceneGraph]) -> None:
            if goal_handle.is_active:
                message = AskSpatialAction.Feedback(stage=stage, tokens_generated=tokens)
                if graph is not None:
                    message.scene_graph = graph
                goal_handle.publish_feedback(message)

        outcome = await self._answer(goal_handle.request, request_id, feedback=feedback)
        result = self._fill(AskSpatialAction.Result(), outcome)
        if goal_handle.is_cancel_requested:
            goal_handle.canceled()
        elif result.success:
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return result

    def _on_cancel(self, goal_handle) -> CancelResponse:
        ticket = self._tickets.get(bytes(goal_handle.goal_id.uuid).hex())
        if ticket is not None:
            ticket.cancel()      # frees the queue place; a running generation finishes but is discarded
        return CancelResponse.ACCEPT

    @staticmethod
    def _fill(response, outcome):
        if isinstance(outcome, RequestFailed):
            response.success, response.error_code, response.message = False, outcome.code, str(outcome)
        else:
            response.success, response.error_code, response.message, response.answer = True, Error.ERROR_NONE, "", outcome
        return response

    async def _answer(self, request, request_id: str, feedback) -> SpatialAnswer | RequestFailed:
        """Validate, pick the frame, run the model, and publish. Every path returns an answer or an error."""
        self.requests_in_progress += 1
        try:
            if not self._active or self._scheduler is None:
                raise RequestFailed(Error.ERROR_NOT_ACTIVE, f"node is not active (state: {self.lifecycle_state()})")
            question, options = request.question, list(request.options)
            try:
                build_prompt(question, options, (1, 1), self._pipeline.prompt)   # question checks, before frames
                check_raw_sizes(question, options, self._pipeline.prompt)
            except InvalidRequest as exc:
                raise RequestFailed(Error.ERROR_INVALID_REQUEST, str(exc)) from None
            source = self._source(request)
            scene_sent = threading.Event()
            progress = {"tokens": -FEEDBACK_EVERY_TOKENS}

            def on_text(text: str, tokens: int) -> None:       # worker thread
                if feedback is None:
                    return
                if not scene_sent.is_set() and scene_text_complete(text):
                    scene_sent.set()
                    self._post(lambda: feedback(AskSpatialAction.Feedback.STAGE_SCENE_READY, tokens,
                                                self._partial_scene(inference_request, text, source)))
                elif tokens - progress["tokens"] >= FEEDBACK_EVERY_TOKENS:
                    progress["tokens"] = tokens
                    stage = (AskSpatialAction.Feedback.STAGE_SCENE_READY if scene_sent.is_set()
                             else AskSpatialAction.Feedback.STAGE_GENERATING)
                    self._post(lambda: feedback(stage, tokens, None))

            try:
                inference_request = prepare_request(source.rgb, question, options, self._pipeline,
                                                    scene_only=request.scene_only,
                                                    on_text=on_text if feedback else None, request_id=request_id)
            except InvalidRequest as exc:
                raise RequestFailed(Error.ERROR_INVALID_REQUEST, str(exc)) from None
            height, width = inference_request.image.shape[:2]
            if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
                raise RequestFailed(Error.ERROR_INVALID_REQUEST,
                                    f"image of {width}x{height} pixels is longer than {MAX_ASPECT_RATIO}:1, "
                                    "which the model cannot take")
            if feedback:
                feedback(AskSpatialAction.Feedback.STAGE_QUEUED, 0, None)
            outcome = await self._run(inference_request, feedback)
            if isinstance(outcome, BackendError) and outcome.kind == BackendErrorKind.OUT_OF_MEMORY:
                smaller = self._smaller(inference_request, source, question, options, request.scene_only, on_text)
                if smaller is not None:
                    self.get_logger().warning(f"request {request_id}: out of memory, retrying with a smaller image")
                    inference_request = smaller
                    outcome = await self._run(inference_request, feedback)
            if isinstance(outcome, BackendError):
                raise RequestFailed(Error.ERROR_BACKEND, f"backend {self._backend_name()}: {outcome}")
            result = finish_result(inference_request, outcome, options,
                                   camera_size=(source.rgb.shape[1], source.rgb.shape[0]),
                                   depth=source.depth, intrinsics=source.intrinsics,
                                   scene_only=request.scene_only, config=self._pipeline)
            answer = spatial_answer_msg(result, source.header, request_id, source.camera, question, options)
            self._publish(answer, result, source)
            return answer
        except RequestFailed as failure:
            if failure.code not in (Error.ERROR_BUSY, Error.ERROR_NOT_ACTIVE):   # throttled: callers control the rate
                self._warn_throttled(f"request/{failure.code}", f"request {request_id} failed: {failure}")
            return failure
        except Exception as exc:   # a bug must still answer the caller, and never stop the node
            self.get_logger().error(f"request {request_id}: unexpected {type(exc).__name__}: {exc}")
            return RequestFailed(Error.ERROR_BACKEND, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self.requests_in_progress -= 1

    def _backend_name(self) -> str:
        return self._param("backend")

    async def _run(self, inference_request: InferenceRequest, feedback) -> InferenceResult | BackendError:
        """Queue the request and wait for the worker, without blocking the executor."""
        scheduler = self._scheduler
        if scheduler is None:
            raise RequestFailed(Error.ERROR_NOT_ACTIVE, "node is not active")
        on_start = None
        if feedback:
            on_start = lambda: self._post(lambda: feedback(AskSpatialAction.Feedback.STAGE_GENERATING, 0, None))
        try:
            ticket = scheduler.submit(inference_request, timeout_s=self._param("request_timeout"), on_start=on_start)
        except QueueFull as exc:
            raise RequestFailed(Error.ERROR_BUSY, str(exc)) from None
        except SchedulerStopped as exc:
            raise RequestFailed(Error.ERROR_NOT_ACTIVE, str(exc)) from None
        request_id = inference_request.request_id
        self._tickets[request_id] = ticket
        done: Future = Future()
        ticket.future.add_done_callback(lambda f: self._post(lambda: done.set_result(f)))
        await done
        del self._tickets[request_id]
        worker_future: concurrent.futures.Future = done.result()
        try:
            return worker_future.result()
        except BackendError as exc:
            return exc
        except RequestTimeout as exc:
            raise RequestFailed(Error.ERROR_TIMEOUT, str(exc)) from None
        except SchedulerStopped as exc:
            raise RequestFailed(Error.ERROR_NOT_ACTIVE, str(exc)) from None
        except RequestCancelled:
            raise RequestFailed(Error.ERROR_CANCELLED, "cancelled by the caller") from None

    def _smaller(self, inference_request, source, question, options, scene_only, on_text):
        height, width = inference_request.image.shape[:2]
        if width * height < OOM_RETRY_MIN_PIXELS:
            return None
        size = (max(28, int(width * OOM_RETRY_SCALE)), max(28, int(height * OOM_RETRY_SCALE)))
        config = dataclasses.replace(self._pipeline, max_input_pixels=size[0] * size[1])
        return prepare_request(source.rgb, question, options, config, scene_only=scene_only,
                               on_text=inference_request.on_text and on_text,
                               request_id=inference_request.request_id)

    def _partial_scene(self, inference_request, text: str, source: Source) -> SceneGraph:
        result = finish_result(inference_request, InferenceResult(text=text), [],
                               camera_size=(source.rgb.shape[1], source.rgb.shape[0]),
                               depth=source.depth, intrinsics=source.intrinsics, scene_only=True,
                               config=self._pipeline)
        return scene_graph_msg(result.parsed.scene, source.header)

    # ---------------------------------------------------------------- frames
    def _source(self, request) -> Source:
        limit = self._param("max_request_image_pixels")
        image = request.image
        # Any field set means the caller meant to send an image: never answer about the camera instead.
        if len(image.data) > 0 or image.width or image.height or image.step or image.encoding:
            if len(image.header.frame_id) > MAX_FRAME_ID_CHARS:
                raise RequestFailed(Error.ERROR_INVALID_REQUEST,
                                    f"request image frame_id is {len(image.header.frame_id)} characters long; "
                                    f"at most {MAX_FRAME_ID_CHARS} are allowed")
            try:
                return Source(image_to_rgb(request.image, limit), request.image.header, camera="")
            except ImageError as exc:
                raise RequestFailed(Error.ERROR_INVALID_REQUEST, f"request image: {exc}") from None
        names = list(self._cameras)
        name = request.camera or names[0]
        camera = self._cameras.get(name)
        if camera is None:
            raise RequestFailed(Error.ERROR_UNKNOWN_CAMERA,
                                f"unknown camera {clip(name)!r}; configured: {', '.join(names)}")
        max_age = request.max_image_age
        if not math.isfinite(max_age) or max_age < 0:
            raise RequestFailed(Error.ERROR_INVALID_REQUEST, f"max_image_age must be >= 0, not {max_age}")
        max_age = max_age or self._param("max_image_age")
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
            raise RequestFailed(Error.ERROR_NO_IMAGE, f"camera {name!r} has not delivered a frame yet on {topic}")
        age = now - frame.time
        if max_age > 0 and age > max_age:
            raise RequestFailed(Error.ERROR_STALE_IMAGE,
                                f"latest frame of camera {name!r} is {age:.2f} s old (limit {max_age:.2f} s)")
        try:
            if isinstance(frame.msg, CompressedImage):
                rgb = compressed_to_rgb(frame.msg, limit)
            else:
                rgb = image_to_rgb(frame.msg, limit)
        except ImageError as exc:
            camera.discard(frame)
            self._warn_throttled(f"decode/{name}", f"camera {name!r}: frame dropped: {exc}")
            raise RequestFailed(Error.ERROR_NO_IMAGE, f"latest frame of camera {name!r} is unusable: {exc}") from None
        source = Source(rgb, frame.msg.header, camera=name)
        if depth is not None:
            self._attach_depth(source, camera, depth)
        return source

    def _attach_depth(self, source: Source, camera: CameraInput, depth: Frame) -> None:
        """Depth + CameraInfo with the frame when both fit; otherwise answer without 3D, with a warning."""
        if camera.info is None:
            return
        colour_aspect = source.rgb.shape[1] / source.rgb.shape[0]
        depth_aspect = depth.msg.width / depth.msg.height
        if abs(colour_aspect - depth_aspect) > ASPECT_TOLERANCE * colour_aspect:
            self._warn_throttled(f"aspect/{camera.name}",
                                 f"camera {camera.name!r}: depth {depth.msg.width}x{depth.msg.height} does not match "
                                 f"colour {source.rgb.shape[1]}x{source.rgb.shape[0]}: no 3D positions")
            return
        try:
            source.depth = depth_image(depth.msg, self._param("depth_scale"), self._param("max_request_image_pixels"))
            source.intrinsics = intrinsics_from_camera_info(camera.info)
        except ValueError as exc:
            source.depth = source.intrinsics = None
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


def check_raw_sizes(question: str, options: list[str], prompt: PromptConfig) -> None:
    """The prompt's length limits, counted before whitespace is trimmed: answers and logs echo the text as sent."""
    if len(question) > prompt.max_question_chars:
        raise InvalidRequest(f"the question is {len(question)} characters long (with its whitespace); "
                             f"at most {prompt.max_question_chars} are allowed")
    for i, option in enumerate(options):
        if len(option) > prompt.max_option_chars:
            raise InvalidRequest(f"option {option_letter(i)} is {len(option)} characters long (with its whitespace); "
                                 f"at most {prompt.max_option_chars} are allowed")


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
