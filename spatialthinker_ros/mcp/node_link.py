"""The MCP server's ROS 2 client of one spatialthinker node: the ask service and its cancel, the ask action
(feedback, cancel), lifecycle state, parameters, ~/stats, and the node's camera topics (the age of their newest
frame, for node_status). Its own rclpy context and executor spin on a thread; the async methods are awaited on the
server's event loop, and every wait is bounded: a node that is absent or goes away gives NodeUnavailable, never a
hang."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

from spatialthinker_ros.core.text import excerpt

SERVER_CHECK_S = 0.25     # how often a wait looks whether the node is still there
CANCEL_RETRY_S = 0.05     # how soon a cancel that found no request is sent again


class NodeUnavailable(RuntimeError):
    """The node is not running (no action server, no parameter service) or went away during a call."""


class CallTimedOut(NodeUnavailable):
    """The node is there but gave no reply within the call's time limit (a long queue, a slow model)."""


@dataclass(frozen=True)
class Progress:
    """One feedback message: stage 0 queued, 1 generating, 2 scene ready (action/AskSpatial.action)."""
    stage: int
    tokens: int


def node_path(name: str, namespace: str) -> str:
    """'/ns/name' from a node name and namespace ('' or '/' = the root)."""
    return f"/{namespace.strip('/')}/{name.strip('/')}".replace("//", "/")


class NodeLink:
    def __init__(self, name: str = "spatialthinker", namespace: str = "/", wait_s: float = 5.0,
                 ros_args: Optional[list[str]] = None):
        """`wait_s`: how long a call waits for the node's action server or parameter service to appear;
        `ros_args`: a command line whose --ros-args apply to this client (an SROS2 enclave, use_sim_time, ...)."""
        import rclpy
        from lifecycle_msgs.srv import GetState
        from rclpy.action import ActionClient
        from rclpy.executors import SingleThreadedExecutor
        from rcl_interfaces.srv import GetParameters
        from std_msgs.msg import String

        from spatialthinker_ros.action import AskSpatial
        from spatialthinker_ros.ros.stats import STATS_QOS
        from spatialthinker_ros.srv import AskSpatial as AskSpatialService
        from spatialthinker_ros.srv import CancelAsk

        self.path, self.namespace, self.wait_s = node_path(name, namespace), f"/{namespace.strip('/')}", wait_s
        self.Action, self.Service, self.Cancel = AskSpatial, AskSpatialService, CancelAsk
        self._context = rclpy.Context()
        rclpy.init(args=ros_args, context=self._context)
        self._node = rclpy.create_node(f"spatialthinker_mcp_{os.getpid()}", context=self._context)
        self._action = ActionClient(self._node, AskSpatial, f"{self.path}/ask_action")
        self._ask = self._node.create_client(AskSpatialService, f"{self.path}/ask")
        self._cancel = self._node.create_client(CancelAsk, f"{self.path}/cancel")
        self._get_state = self._node.create_client(GetState, f"{self.path}/get_state")
        self._get_parameters = self._node.create_client(GetParameters, f"{self.path}/get_parameters")
        self.stats: Optional[dict[str, Any]] = None
        self._node.create_subscription(String, f"{self.path}/stats", self._on_stats, STATS_QOS)
        self._newest_stamps: dict[str, float] = {}   # camera name -> its newest frame's stamp (ROS seconds)
        self._camera_topics: dict[str, str] = {}
        self._cancelling: set[asyncio.Future] = set()   # cancels still being sent (kept from the collector)
        self._cancels: set[Any] = set()   # rclpy futures of cancels sent, or still to send: close() lets them finish
        self._cancels_lock = threading.Lock()   # added to from the event loop's thread and the executor's
        self._closing = False
        self._executor = SingleThreadedExecutor(context=self._context)
        self._executor.add_node(self._node)
        self._spinner = threading.Thread(target=self._spin, name="spatialthinker-mcp-ros", daemon=True)
        self._spinner.start()

    def _spin(self) -> None:
        """Spins until close(). A callback's exception is logged and spinning goes on: rclpy re-raises it from
        spin, and a thread that stopped there would leave every later call waiting out its deadline."""
        while not self._closing:
            try:
                self._executor.spin_once(timeout_sec=SERVER_CHECK_S)
            except Exception as exc:
                if self._closing or not self._context.ok():   # shut down under it (close)
                    return
                self._node.get_logger().error(f"a ROS callback failed: {type(exc).__name__}: {excerpt(exc, 500)}")

    def _on_stats(self, message: Any) -> None:
        try:
            stats = json.loads(message.data)
        except ValueError:
            stats = None
        if isinstance(stats, dict):   # anything else on the topic is not the node's
            self.stats = stats

    def _keep_until_done(self, future: Any) -> Any:
        """Keeps a cancel's rclpy future (or the executor task that will send one) for close(); returns it."""
        with self._cancels_lock:
            self._cancels = {kept for kept in self._cancels if not kept.done()}
            self._cancels.add(future)
        return future

    # ------------------------------------------------------------------ waits
    async def _ready(self, is_ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.wait_s
        while not is_ready():
            if time.monotonic() > deadline:
                raise NodeUnavailable(f"the node {self.path} is not running: no {what} within {self.wait_s:g} s")
            await asyncio.sleep(0.05)

    async def _result(self, future: Any, deadline: float, what: str,
                      alive: Optional[Callable[[], bool]] = None) -> Any:
        """The rclpy future's result; CallTimedOut past the deadline, NodeUnavailable once alive() says the node
        left."""
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(done.set))
        while not future.done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CallTimedOut(f"no {what} from {self.path} in time")
            if alive is not None and not alive():
                raise NodeUnavailable(f"the node {self.path} went away before its {what}")
            try:
                await asyncio.wait_for(done.wait(), min(SERVER_CHECK_S, remaining))
            except asyncio.TimeoutError:
                pass
        return future.result()

    # ------------------------------------------------------------------ asking
    async def ask(self, timeout_s: float, **request: Any) -> Any:
        """One ~/ask call under a request_id of this link's making; its Response (error codes included). A
        cancelled caller (MCP cancellation, the deadline, the node gone) cancels the request with ~/cancel."""
        deadline = time.monotonic() + timeout_s
        await self._ready(lambda: self._ask.service_is_ready() and self._cancel.service_is_ready(),
                          f"services {self.path}/ask and {self.path}/cancel")
        request_id = f"mcp-{uuid.uuid4().hex}"
        # rclpy's Client sends and registers the reply's future under one lock: any thread may call it
        asking = self._ask.call_async(self.Service.Request(request_id=request_id, **request))
        try:
            return await self._result(asking, deadline, "answer", self._ask.service_is_ready)
        except BaseException:   # the first cancel goes out now: this process may be about to stop
            cancel = self.Cancel.Request(request_id=request_id)
            first = self._keep_until_done(self._cancel.call_async(cancel))
            cancelling = asyncio.ensure_future(self._cancel_until_done(cancel, first, asking))
            self._cancelling.add(cancelling)
            cancelling.add_done_callback(self._cancelling.discard)
            raise

    async def _cancel_until_done(self, cancel: Any, sent: Any, asking: Any) -> None:
        """Send ~/cancel again while the node has no request of its id and the request's reply has not come (a
        cancel can overtake its request: they travel on different topics), for at most wait_s."""
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                reply = await self._result(sent, deadline, "cancel reply", self._cancel.service_is_ready)
            except NodeUnavailable:
                return
            if reply.cancelled or asking.done():
                return
            await asyncio.sleep(CANCEL_RETRY_S)
            sent = self._keep_until_done(self._cancel.call_async(cancel))

    async def ask_with_feedback(self, timeout_s: float, on_progress: Callable[[Progress], None], **goal: Any) -> Any:
        """One goal of ~/ask_action; its Result (error codes included). Feedback goes to on_progress on the
        event loop's thread. A cancelled caller (MCP cancellation) cancels the goal."""
        from rclpy.task import Future

        deadline = time.monotonic() + timeout_s
        await self._ready(self._action.server_is_ready, f"action server {self.path}/ask_action")
        loop = asyncio.get_running_loop()

        def feedback(message: Any) -> None:
            loop.call_soon_threadsafe(on_progress, Progress(message.feedback.stage, message.feedback.tokens_generated))
        alive = self._action.server_is_ready
        message = self.Action.Goal(**goal)
        accepted: list[Any] = []     # the goal's handle once accepted; appended and read on the executor's thread
        abandoned = False
        # Done once a dropped goal needs nothing more from the node: its cancel has the node's reply, or the goal was
        # rejected. close() waits for it: a goal dropped before its acceptance reached us is cancelled only then.
        dropped = Future()

        def cancel(handle: Any) -> None:
            handle.cancel_goal_async().add_done_callback(lambda _: dropped.done() or dropped.set_result(None))

        async def goal_then_result() -> Any:
            """On the executor's thread, so the result request goes out as soon as the goal is accepted, with no
            hop through the event loop in between (and because rclpy's ActionClient registers a reply's future only
            after sending the request, without a lock: a quick reply to a request from another thread can be lost)."""
            handle = await self._action.send_goal_async(message, feedback)
            if not handle.accepted:
                dropped.set_result(None)
                return None
            accepted.append(handle)
            if abandoned:   # the caller gave up while the goal was on its way (its feedback can come first)
                cancel(handle)
            return (await handle.get_result_async()).result

        def abandon() -> None:   # on the executor's thread: cancels the goal now, or once it is accepted
            nonlocal abandoned
            abandoned = True
            for handle in accepted:
                cancel(handle)

        try:
            result = await self._result(self._executor.create_task(goal_then_result), deadline, "answer", alive)
        except BaseException:   # cancelled by the MCP client, timed out, or the node left: the goal is dropped
            self._keep_until_done(dropped)
            self._executor.create_task(abandon)
            raise
        if result is None:
            raise NodeUnavailable(f"{self.path}/ask_action rejected the goal")
        return result

    async def _on_executor(self, call: Callable, *args: Any) -> Any:
        """call(*args) run on the executor's thread; its return value."""
        return await self._result(self._executor.create_task(call, *args), time.monotonic() + self.wait_s,
                                  "the ROS executor")

    # ------------------------------------------------------------------ state
    async def lifecycle_state(self) -> str:
        from lifecycle_msgs.srv import GetState

        await self._ready(self._get_state.service_is_ready, f"service {self.path}/get_state")
        response = await self._result(self._get_state.call_async(GetState.Request()),
                                      time.monotonic() + self.wait_s, "lifecycle state")
        return response.current_state.label

    async def parameters(self, *names: str) -> dict[str, Any]:
        """The node's parameters by name (their values as Python values)."""
        from rcl_interfaces.srv import GetParameters
        from rclpy.parameter import parameter_value_to_python

        await self._ready(self._get_parameters.service_is_ready, f"service {self.path}/get_parameters")
        response = await self._result(self._get_parameters.call_async(GetParameters.Request(names=list(names))),
                                      time.monotonic() + self.wait_s, "parameters")
        return {name: parameter_value_to_python(value) for name, value in zip(names, response.values)}

    async def wait_for_stats(self) -> None:
        """Until the node's ~/stats has arrived here, for at most wait_s (the topic is transient local: a subscriber
        gets the last message as soon as it has matched the node's publisher)."""
        with contextlib.suppress(NodeUnavailable):   # none in time: status is reported without them
            await self._ready(lambda: self.stats is not None, f"~/stats from {self.path}")

    def now_s(self) -> float:
        return self._node.get_clock().now().nanoseconds * 1e-9

    # ------------------------------------------------------------------ camera frames
    async def watch_cameras(self) -> dict[str, str]:
        """Subscribe (once) to the colour topic of each of the node's cameras, as the node resolves them (its
        cameras and image_transport parameters, in its namespace); camera name -> topic."""
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import CompressedImage, Image

        from spatialthinker_ros.ros.camera_inputs import topic_prefix

        if self._camera_topics:
            return self._camera_topics
        params = await self.parameters("cameras", "image_transport")
        compressed = params["image_transport"] == "compressed"

        def subscribe() -> None:   # on the executor's thread, so its wait set takes the subscriptions in at once
            for name in params["cameras"] or []:
                if name in self._camera_topics:
                    continue
                transport = "image/compressed" if compressed else "image"
                topic = f"{self.namespace.rstrip('/')}/{topic_prefix(name)}{transport}"
                self._node.create_subscription(CompressedImage if compressed else Image, topic,
                                               lambda message, name=name: self._on_frame(name, message),
                                               qos_profile_sensor_data)
                self._camera_topics[name] = topic

        await self._on_executor(subscribe)
        return self._camera_topics

    def _on_frame(self, camera: str, message: Any) -> None:
        stamp = message.header.stamp
        self._newest_stamps[camera] = stamp.sec + stamp.nanosec * 1e-9

    def last_frame_age_s(self, camera: str) -> Optional[float]:
        """ROS time since the newest frame this link received from the camera's topic; None before the first."""
        stamp = self._newest_stamps.get(camera)
        return None if stamp is None else max(0.0, self.now_s() - stamp)

    def close(self) -> None:
        """First lets the cancels on their way get the node's reply, for at most wait_s: this process is often about
        to exit (a client that cancelled a call and left), and a cancel lost with it would leave the node answering
        nobody. Then stops spinning before the node and context go: rclpy aborts the process if a spinning thread
        outlives them."""
        deadline = time.monotonic() + self.wait_s
        while self._context.ok() and time.monotonic() < deadline and \
                (self._cancel.service_is_ready() or self._action.server_is_ready()):   # no node, no reply
            with self._cancels_lock:
                if all(kept.done() for kept in self._cancels):
                    break
            time.sleep(CANCEL_RETRY_S)
        self._closing = True
        self._executor.shutdown(timeout_sec=5.0)
        self._spinner.join(timeout=5.0)
        self._node.destroy_node()
        self._context.try_shutdown()
