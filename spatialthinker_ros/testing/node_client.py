"""The node's client on a real ROS graph, spun on the caller's thread: NodeClient (the ask service and action,
lifecycle transitions, the published outputs and ~/stats) and the spin waits under it. Every wait is bounded and
fails with WaitFailed naming what did not arrive, at once when the node process exits, and with ReplyLost at once
when the node's ~/stats say it abandoned a reply. rclpy is imported when these run.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any, Callable, Optional

from spatialthinker_ros.testing.processes import Process, WaitFailed

DEFAULT_NAMESPACE = "/spatialthinker"


class ReplyLost(WaitFailed):
    """The node's ~/stats count a reply it abandoned (spatialthinker_ros.ros.replies): no use waiting for it."""


class NodeStats:
    """The node's ~/stats (spatialthinker_ros.ros.stats) as they arrive on a node of the caller's, newest last."""

    def __init__(self, node: Any, namespace: str = DEFAULT_NAMESPACE):
        from std_msgs.msg import String

        from spatialthinker_ros.ros.stats import STATS_QOS

        self.received: list[dict[str, Any]] = []
        self.subscription = node.create_subscription(
            String, f"{namespace.rstrip('/')}/stats", lambda message: self.received.append(json.loads(message.data)),
            STATS_QOS)

    def replies(self, counter: str) -> int:
        """A reply counter of the newest stats ("dropped", "resent", "abandoned"); 0 before any arrived."""
        return self.received[-1]["replies"][counter] if self.received else 0


def new_context() -> Any:
    """An rclpy context of its own (init'ed); shut it down with context.try_shutdown()."""
    import rclpy

    context = rclpy.Context()
    rclpy.init(context=context)
    return context


def spin_wait(node: Any, done: Callable[[], bool], timeout: float, what: str,
              process: Optional[Process] = None, stats: Optional[NodeStats] = None) -> None:
    """Spin `node` until done(); WaitFailed naming `what` when the timeout passes, or at once when `process` (the
    node under test) exits, and ReplyLost at once when `stats` (that node's ~/stats) count a reply abandoned since
    the wait began. A fresh executor each call: a node may sit in one executor at a time."""
    from rclpy.executors import SingleThreadedExecutor

    abandoned = stats.replies("abandoned") if stats is not None else 0
    executor = SingleThreadedExecutor(context=node.context)
    executor.add_node(node)
    deadline = time.monotonic() + timeout
    try:
        while not done():
            if process is not None and not process.alive():
                raise WaitFailed(f"{process.name} exited while waiting for {what}: {process.describe()}")
            if stats is not None and stats.replies("abandoned") > abandoned:
                who = process.name if process is not None else "the node"
                raise ReplyLost(f"reply lost: {who} abandoned a reply in transport while we waited for {what} "
                                f"(~/stats: {stats.received[-1]['replies']})")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if done():
                    return
                detail = f": {process.describe()}" if process is not None else ""
                raise WaitFailed(f"timed out after {timeout:.1f} s waiting for {what}{detail}")
            executor.spin_once(timeout_sec=min(0.05, remaining))
    finally:
        executor.remove_node(node)
        executor.shutdown()


def spin_until(node: Any, predicate: Callable[[], bool], timeout: float) -> bool:
    """Spin `node` until predicate() is true or the timeout passes; returns predicate() (tests assert on it)."""
    try:
        spin_wait(node, predicate, timeout, "a condition")
    except WaitFailed:
        return predicate()
    return True


def spin_future(node: Any, future: Any, timeout: float, what: str = "the result",
                process: Optional[Process] = None, stats: Optional[NodeStats] = None) -> Any:
    """Spin until the rclpy future is done and return its result; WaitFailed naming `what` otherwise (see
    spin_wait for what `process` and `stats`, of the node answering, add)."""
    spin_wait(node, future.done, timeout, what, process, stats)
    return future.result()


class NodeClient:
    """~/ask (service) and ~/ask_action clients for one node, spun on the caller's thread; every wait is bounded
    and fails with WaitFailed naming what did not arrive (with the node's state and log tail when `process` is
    known), at once if the node process exits, and with ReplyLost at once if the node abandons a reply.

    The node's ~/stats are always received (waits read the abandoned replies there): kept in `stats` as dicts
    (published after every reply and whenever a reply counter changes), newest last. With `outputs`, subscribes to
    the node's answer, scene_graph and markers topics (and debug_image with `debug_image`); what arrives is kept in
    `answers`, `graphs`, `markers`, `debug`, newest last. A benchmark leaves those off: a subscriber makes the node
    send what it publishes.
    """

    def __init__(self, context: Any, namespace: str = DEFAULT_NAMESPACE, process: Optional[Process] = None,
                 node_name: Optional[str] = None, queue_depth: int = 100, outputs: bool = True,
                 debug_image: bool = True):
        from lifecycle_msgs.srv import ChangeState, GetState
        from rclpy.action import ActionClient
        from rclpy.node import Node
        from rclpy.qos import QoSProfile
        from sensor_msgs.msg import Image
        from visualization_msgs.msg import MarkerArray

        from spatialthinker_ros.action import AskSpatial as AskSpatialAction
        from spatialthinker_ros.msg import SceneGraph, SpatialAnswer
        from spatialthinker_ros.srv import AskSpatial

        self.Service, self.Action = AskSpatial, AskSpatialAction
        self.namespace, self.process = namespace.rstrip("/"), process
        self.node = Node(node_name or f"ask_client_{os.getpid()}_{next(_CLIENT_IDS)}", context=context)
        self.service = self.node.create_client(AskSpatial, f"{self.namespace}/ask",
                                               qos_profile=QoSProfile(depth=queue_depth))
        self.action = ActionClient(self.node, AskSpatialAction, f"{self.namespace}/ask_action")
        # made with the others, so they are discovered long before a test's timed transition
        self.change_state_client = self.node.create_client(ChangeState, f"{self.namespace}/change_state")
        self.get_state_client = self.node.create_client(GetState, f"{self.namespace}/get_state")
        self.answers: list[Any] = []
        self.graphs: list[Any] = []
        self.markers: list[Any] = []
        self.node_stats = NodeStats(self.node, self.namespace)
        self.stats = self.node_stats.received
        self.debug: list[Any] = []
        if outputs:
            self.node.create_subscription(SpatialAnswer, f"{self.namespace}/answer", self.answers.append, 10)
            self.node.create_subscription(SceneGraph, f"{self.namespace}/scene_graph", self.graphs.append, 10)
            self.node.create_subscription(MarkerArray, f"{self.namespace}/markers", self.markers.append, 10)
        if outputs and debug_image:
            self.node.create_subscription(Image, f"{self.namespace}/debug_image", self.debug.append, 2)

    def wait(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        """Spin until done(); WaitFailed naming `what` when the timeout passes or the node process exits first."""
        spin_wait(self.node, done, timeout, what, self.process, self.node_stats)

    def watch(self, process: Optional[Process]) -> None:
        """From now on, waits fail at once (with its log tail) if this node process exits."""
        if process is not None:
            self.process = process

    def wait_for_service(self, process: Optional[Process] = None, timeout: float = 60.0) -> None:
        self.watch(process)
        self.wait(self.service.service_is_ready, timeout, f"the service {self.namespace}/ask")

    def wait_for_action(self, process: Optional[Process] = None, timeout: float = 60.0) -> None:
        self.watch(process)
        self.wait(self.action.server_is_ready, timeout, f"the action server {self.namespace}/ask_action")

    def call(self, request: Any, timeout: float = 30.0, client: Any = None) -> Any:
        """One service call on `client` (default: the node's ~/ask); WaitFailed (the pending request dropped)
        when no reply comes in time."""
        client = client or self.service
        future = client.call_async(request)
        try:
            self.wait(future.done, timeout, f"the reply of {client.srv_name}")
        except WaitFailed:
            client.remove_pending_request(future)
            raise
        return future.result()

    def change_state(self, transition_id: int, timeout: float = 30.0) -> bool:
        """Ask the lifecycle node for a transition (a lifecycle_msgs Transition id); whether it was made."""
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState

        self.wait(self.change_state_client.service_is_ready, timeout, f"the service {self.namespace}/change_state")
        request = ChangeState.Request(transition=Transition(id=transition_id))
        return self.call(request, timeout, self.change_state_client).success

    def lifecycle_state(self, timeout: float = 30.0) -> str:
        """The lifecycle node's state: "unconfigured", "inactive", "active", ..."""
        from lifecycle_msgs.srv import GetState

        self.wait(self.get_state_client.service_is_ready, timeout, f"the service {self.namespace}/get_state")
        return self.call(GetState.Request(), timeout, self.get_state_client).current_state.label

    def set_parameters(self, timeout: float = 30.0, **values: Any) -> None:
        """Set the node's parameters, as `ros2 param set` does; AssertionError with the reasons of any refused."""
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        setter = self.node.create_client(SetParameters, f"{self.namespace}/set_parameters")
        try:
            self.wait(setter.service_is_ready, timeout, f"the service {self.namespace}/set_parameters")
            request = SetParameters.Request(parameters=[Parameter(k, value=v).to_parameter_msg()
                                                        for k, v in values.items()])
            results = self.call(request, timeout, setter).results
            assert all(r.successful for r in results), [r.reason for r in results]
        finally:
            self.node.destroy_client(setter)

    def ask(self, timeout: float = 30.0, **fields: Any) -> Any:
        """AskSpatial.Request(**fields) by the service; its response."""
        return self.call(self.Service.Request(**fields), timeout)

    def ask_action(self, timeout: float = 30.0, on_feedback: Optional[Callable[[Any], None]] = None,
                   **fields: Any) -> Any:
        """AskSpatial.Goal(**fields) by the action; its result (feedback messages go to on_feedback)."""
        callback = (lambda message: on_feedback(message.feedback)) if on_feedback else None
        sending = self.action.send_goal_async(self.Action.Goal(**fields), feedback_callback=callback)
        deadline = time.monotonic() + timeout
        self.wait(sending.done, timeout, f"the goal of {self.namespace}/ask_action to be accepted or rejected")
        handle = sending.result()
        if not handle.accepted:
            raise WaitFailed(f"{self.namespace}/ask_action rejected the goal")
        getting = handle.get_result_async()
        self.wait(getting.done, max(0.0, deadline - time.monotonic()), f"the result of {self.namespace}/ask_action")
        return getting.result().result

    def ask_until_ready(self, process: Optional[Process] = None, timeout: float = 60.0, with_depth: bool = False,
                        by_action: bool = False,
                        on_feedback: Optional[Callable[[Any], None]] = None, call_timeout: float = 30.0,
                        **fields: Any) -> Any:
        """Waits for the service (or action server), then asks until the node has a camera frame: best-effort
        frames may take seconds to start flowing after discovery, so ERROR_NO_IMAGE means ask again (and, with
        with_depth, so does a successful answer without 3D, since depth and CameraInfo can lag the first colour
        frame). Returns the first other response; WaitFailed if none comes within `timeout`."""
        deadline = time.monotonic() + timeout
        if by_action:
            self.wait_for_action(process, timeout)
        else:
            self.wait_for_service(process, timeout)
        while True:
            remaining = max(1.0, deadline - time.monotonic())
            response = (self.ask_action(min(call_timeout, remaining), on_feedback, **fields) if by_action
                        else self.ask(min(call_timeout, remaining), **fields))
            waiting = response.error_code == self.Service.Response.ERROR_NO_IMAGE or (
                with_depth and response.success
                and not any(o.has_position for o in response.answer.scene_graph.objects))
            if not waiting:
                return response
            if time.monotonic() > deadline:
                what = "a camera frame" if not response.success else "a camera frame with depth"
                raise WaitFailed(f"the node had no {what} after {timeout:.1f} s: last reply {response.message!r}"
                                 + (f": {self.process.describe()}" if self.process is not None else ""))
            # the next frame: camera drivers publish at 10-30 Hz
            pause_until = time.monotonic() + 0.1
            self.wait(lambda: time.monotonic() >= pause_until, 1.0, "the next camera frame")

    def close(self) -> None:
        self.action.destroy()
        self.node.destroy_node()


_CLIENT_IDS = itertools.count()
