"""What the demo, the tests and the benchmarks share to run the real node: an isolated ROS graph, child processes
stopped by pid, a fake camera, and a client that asks until the node has a frame.

Importing this module imports no ROS: `isolate_ros()` must run before rclpy creates its first context, and the GPU
benchmark uses `Process`-free parts of it on machines without ROS. The ROS-side classes import rclpy when built.

Every wait here has a deadline and fails with `WaitFailed`, naming what did not arrive (and, when a node process
is known, whether it died and the tail of its log), never by returning None.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from spatialthinker_ros.distro import PROFILE_VARIABLES, fastdds_profile_variable
from spatialthinker_ros.launch_config import parameter_arguments

LARGE_IMAGES_PROFILE_NAME = "fastdds_large_images.xml"
DDS_TRANSPORTS = ("shm_large", "default")
DEFAULT_NAMESPACE = "/spatialthinker"


class WaitFailed(TimeoutError):
    """A bounded wait ended without its condition: the message names what did not arrive, and why if known."""


class ReplyLost(WaitFailed):
    """The node logged that a reply will never reach its caller (spatialthinker_ros.ros.replies): no use waiting."""


# ------------------------------------------------------------------------------------------------ isolation
def isolate_ros(prefix: str = "spatialthinker-", offline: bool = True) -> Path:
    """Localhost-only discovery, a random domain, a temporary log folder and the large-frame Fast DDS profile, for
    this process and every child it starts (they inherit os.environ). Call before rclpy creates a context.

    A Fast DDS profile the user already set (under either Fast DDS's variable name) wins. `offline` keeps transformers and the hub from the network.
    Returns the temporary folder (ROS logs under roslog/, free for scratch files); remove it with shutil.rmtree.
    """
    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ.setdefault("AMENT_PREFIX_PATH", sys.prefix)   # a sourced ROS install wins; else the venv is the prefix
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ.pop("ROS_LOCALHOST_ONLY", None)   # deprecated; conflicts with the discovery range when set
    os.environ["ROS_DOMAIN_ID"] = str(random.SystemRandom().randint(1, 100))
    os.environ["ROS_LOG_DIR"] = str(scratch / "roslog")
    os.environ["PYTHONUNBUFFERED"] = "1"        # children's logs are complete when read
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    profile = large_images_profile()
    if profile is not None and not any(os.environ.get(name) for name in PROFILE_VARIABLES):
        os.environ[fastdds_profile_variable()] = str(profile)
    return scratch


def large_images_profile() -> Optional[Path]:
    """The shipped Fast DDS profile without which frames over 512 KB stall for seconds on one machine (see the
    file): the installed share folder's copy, else the source checkout's."""
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

        try:
            path = Path(get_package_share_directory("spatialthinker_ros")) / "config" / LARGE_IMAGES_PROFILE_NAME
        except (PackageNotFoundError, OSError):   # not installed, or no ROS prefix in the environment
            path = None
        if path is not None and path.is_file():
            return path
    except ImportError:   # the ROS-free install (pip) has no ament index
        pass
    source = Path(__file__).resolve().parents[1] / "config" / LARGE_IMAGES_PROFILE_NAME
    return source if source.is_file() else None


def use_dds_transport(kind: str) -> None:
    """Before rclpy.init, for this process and its children: shm_large is the shipped profile (shared memory with
    64 MB segments, + UDP); default is Fast DDS as installed (no profile)."""
    if kind == "shm_large":
        profile = large_images_profile()
        if profile is None:
            raise FileNotFoundError(f"{LARGE_IMAGES_PROFILE_NAME} is neither installed nor in this checkout")
        os.environ[fastdds_profile_variable()] = str(profile)
    elif kind == "default":
        for name in PROFILE_VARIABLES:
            os.environ.pop(name, None)
    else:
        raise ValueError(f"unknown DDS transport {kind!r}; one of {DDS_TRANSPORTS}")


# ------------------------------------------------------------------------------------------------ processes
def interruptible() -> None:
    """For a child, before it starts: SIGINT (Ctrl-C) back to its default. A process started with SIGINT ignored
    (under nohup, or by a non-interactive shell's `&`) passes that on to every child, and Python then never
    raises KeyboardInterrupt: stop() and the interrupt tests would wait in vain."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Process:
    """A child process whose output goes to a file (shown when something fails); stopped by its own pid only.

    It gets its own session, so a Ctrl-C in a terminal reaches only its parent, which then stops it.
    """

    def __init__(self, args: Sequence[str], log_path: Path, env: Optional[dict[str, str]] = None,
                 name: Optional[str] = None):
        self.args = list(args)
        self.name = name or Path(self.args[0]).name
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT,
                                      env=os.environ.copy() if env is None else env, start_new_session=True,
                                      preexec_fn=interruptible)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def exit_code(self) -> Optional[int]:
        """None while it runs."""
        return self.popen.poll()

    def output(self) -> str:
        """Everything it wrote so far."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def describe(self) -> str:
        """Whether it still runs, and its log's tail: what a failed wait adds to its message."""
        code = self.exit_code()
        state = "still running" if code is None else f"exited with code {code}"
        return f"{self.name} (pid {self.pid}) {state}; last lines of {self.log_path}:\n{self.tail()}"

    def stop(self, sig: int = signal.SIGINT, timeout: float = 10.0) -> Optional[int]:
        """Send `sig` to this pid (the node shuts down cleanly on SIGINT); SIGKILL if it has not exited in time."""
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(sig)
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=timeout)
        if not self._log.closed:
            self._log.close()
        return self.popen.returncode


class Processes:
    """Starts children with logs in one folder; on exit (or `stop_all`) stops each by its pid, newest first."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.started: list[Process] = []

    def start(self, args: Sequence[str], name: str = "proc", env: Optional[dict[str, str]] = None) -> Process:
        process = Process(args, self.log_dir / f"{name}-{len(self.started)}.log", env=env, name=name)
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.started):
            process.stop()

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_all()


def node_executable() -> list[str]:
    """What starts the node: the installed spatialthinker_node (next to this Python, else on PATH), else its
    module run by this Python."""
    executable = Path(sys.executable).parent / "spatialthinker_node"
    if executable.is_file():
        return [str(executable)]
    if shutil.which("spatialthinker_node"):
        return [str(shutil.which("spatialthinker_node"))]
    return [sys.executable, "-m", "spatialthinker_ros.ros.node"]


def node_command(*ros_args: str, **params: Any) -> list[str]:
    """node_executable() with `ros_args` (e.g. "-r", "__node:=name") and -p name:=value for each parameter
    (lists as YAML)."""
    return node_executable() + ["--ros-args", *ros_args, *parameter_arguments(params)]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, process: Optional[Process] = None,
             interval: float = 0.05) -> None:
    """Poll (no ROS spinning) until predicate() is true; WaitFailed naming `what` otherwise, or at once when
    `process` exits first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if process is not None and not process.alive():
            raise WaitFailed(f"{process.name} exited while waiting for {what}: {process.describe()}")
        if time.monotonic() > deadline:
            raise WaitFailed(f"timed out after {timeout:.1f} s waiting for {what}"
                             + (f": {process.describe()}" if process is not None else ""))
        time.sleep(interval)


# ------------------------------------------------------------------------------------------------ ROS helpers
def new_context() -> Any:
    """An rclpy context of its own (init'ed); shut it down with context.try_shutdown()."""
    import rclpy

    context = rclpy.Context()
    rclpy.init(context=context)
    return context


def spin_wait(node: Any, done: Callable[[], bool], timeout: float, what: str,
              process: Optional[Process] = None) -> None:
    """Spin `node` until done(); WaitFailed naming `what` when the timeout passes, or at once when `process` (the
    node under test) exits, and ReplyLost at once when it logs that a reply was lost in transport since the wait
    began (its log is read twice a second). A fresh executor each call: a node may sit in one executor at a time."""
    from rclpy.executors import SingleThreadedExecutor

    lost_replies = _LostReplies(process)
    executor = SingleThreadedExecutor(context=node.context)
    executor.add_node(node)
    deadline = time.monotonic() + timeout
    try:
        while not done():
            if process is not None and not process.alive():
                raise WaitFailed(f"{process.name} exited while waiting for {what}: {process.describe()}")
            lost = lost_replies.new()
            if lost:
                raise ReplyLost(f"{process.name} lost a reply in transport while we waited for {what}: {lost[-1]}")
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


class _LostReplies:
    """The node's `reply lost` log lines (ros/replies.py) that appeared after this was made."""

    def __init__(self, process: Optional[Process]):
        self.process, self.next_read = process, time.monotonic()
        self.seen = len(self._lines()) if process is not None else 0

    def _lines(self) -> list[str]:
        from spatialthinker_ros.ros.replies import REPLY_LOST, dropped_reply_lines

        return [line for line in dropped_reply_lines(self.process.output()) if REPLY_LOST in line]

    def new(self) -> list[str]:
        if self.process is None or time.monotonic() < self.next_read:
            return []
        self.next_read = time.monotonic() + 0.5
        return self._lines()[self.seen:]


def spin_until(node: Any, predicate: Callable[[], bool], timeout: float) -> bool:
    """Spin `node` until predicate() is true or the timeout passes; returns predicate() (tests assert on it)."""
    try:
        spin_wait(node, predicate, timeout, "a condition")
    except WaitFailed:
        return predicate()
    return True


def spin_future(node: Any, future: Any, timeout: float, what: str = "the result",
                process: Optional[Process] = None) -> Any:
    """Spin until the rclpy future is done and return its result; WaitFailed naming `what` otherwise (see
    spin_wait for what `process`, the node answering, adds)."""
    spin_wait(node, future.done, timeout, what, process)
    return future.result()


def pattern_image(width: int, height: int) -> np.ndarray:
    """A deterministic RGB image with structure (so JPEG and resizing have something to keep)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)),
                     ((x // 32 + y // 32) % 2) * 255], axis=-1).astype(np.uint8)


def _spin_in_thread(node: Any, context: Any, name: str) -> tuple[Any, threading.Thread]:
    from rclpy.executors import SingleThreadedExecutor

    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    thread = threading.Thread(target=executor.spin, name=name, daemon=True)
    thread.start()
    return executor, thread


class FakeCamera:
    """Publishes colour (rgb8, or JPEG on image/compressed) + depth + CameraInfo at a fixed rate, with sensor-data
    QoS and one stamp per frame, like a driver. Depth and CameraInfo go out before the colour frame of the same
    stamp, as they pair in the node. It spins its own node on a thread in `context`, so frames keep flowing while
    the caller waits.

    depth_m: metres, sent as `depth_encoding` (32FC1 metres or 16UC1 millimetres); None: colour only.
    depth_lags: each depth frame (and CameraInfo) carries the previous colour frame's stamp, as from a driver whose
    depth arrives one frame late.
    """

    def __init__(self, context: Any, prefix: str = "", width: int = 640, height: int = 480,
                 rate_hz: float = 20.0, frame_id: str = "camera_color_optical_frame", compressed: bool = False,
                 depth_m: Optional[np.ndarray] = None, depth_encoding: str = "32FC1",
                 k: Optional[Sequence[float]] = None, stamp_offset_s: float = 0.0, depth_lags: bool = False,
                 rgb: Optional[np.ndarray] = None):
        from rclpy.node import Node
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import CameraInfo, CompressedImage, Image
        from std_msgs.msg import Header

        from spatialthinker_ros.core.geometry import CameraIntrinsics, DepthImage
        from spatialthinker_ros.ros.conversions import (camera_info_msg, depth_to_image_msg, rgb_to_compressed_msg,
                                                        rgb_to_image_msg)

        self.rgb = pattern_image(width, height) if rgb is None else np.ascontiguousarray(rgb)
        height, width = self.rgb.shape[:2]
        self.frame_id, self.compressed, self.stamp_offset_s = frame_id, compressed, stamp_offset_s
        self.depth_m, self.depth_lags, self._previous_header = depth_m, depth_lags, None
        self.published_stamps: list[tuple[int, int]] = []   # (sec, nanosec) of every colour frame sent
        self._to_subscribers = 0
        self.node = Node(f"fake_camera_{os.getpid()}_{id(self)}", context=context)
        qos = qos_profile_sensor_data
        if compressed:
            self._colour = rgb_to_compressed_msg(self.rgb, Header())
            self.colour_pub = self.node.create_publisher(CompressedImage, f"{prefix}image/compressed", qos)
        else:
            self._colour = rgb_to_image_msg(self.rgb, Header())
            self.colour_pub = self.node.create_publisher(Image, f"{prefix}image", qos)
        self._depth = self._info = None
        if depth_m is not None:
            dh, dw = depth_m.shape
            if depth_encoding == "16UC1":
                depth = DepthImage(np.rint(depth_m * 1000).astype(np.uint16), 0.001)
            elif depth_encoding == "32FC1":
                depth = DepthImage.from_metres(depth_m.astype(np.float32))
            else:
                raise ValueError(f"depth_encoding must be 16UC1 or 32FC1, not {depth_encoding!r}")
            self._depth = depth_to_image_msg(depth, Header())
            k = list(k) if k is not None else [500.0, 0.0, dw / 2, 0.0, 500.0, dh / 2, 0.0, 0.0, 1.0]
            self._info = camera_info_msg(CameraIntrinsics.from_k(k, dw, dh), Header())
            self.depth_pub = self.node.create_publisher(Image, f"{prefix}depth", qos)
            self.info_pub = self.node.create_publisher(CameraInfo, f"{prefix}camera_info", qos)
        self._publishers = [p for p in (self.colour_pub, getattr(self, "depth_pub", None),
                                        getattr(self, "info_pub", None)) if p is not None]
        self.node.create_timer(1.0 / rate_hz, self.publish)
        self._executor, self._thread = _spin_in_thread(self.node, context, "fake-camera")

    def header(self) -> Any:
        from rclpy.duration import Duration
        from std_msgs.msg import Header

        stamp = self.node.get_clock().now()
        if self.stamp_offset_s:
            stamp = stamp - Duration(nanoseconds=int(self.stamp_offset_s * 1e9))
        return Header(stamp=stamp.to_msg(), frame_id=self.frame_id)

    def publish(self) -> None:
        """One frame now (the timer calls it)."""
        header = self.header()
        depth_header, self._previous_header = (self._previous_header, header) if self.depth_lags else (header, None)
        if self._depth is not None and depth_header is not None:
            self._depth.header = self._info.header = depth_header
            self.depth_pub.publish(self._depth)
            self.info_pub.publish(self._info)
        self._colour.header = header
        self.colour_pub.publish(self._colour)
        self._to_subscribers = self._to_subscribers + 1 if self.subscribed() else 0
        self.published_stamps.append((header.stamp.sec, header.stamp.nanosec))

    def subscribed(self) -> bool:
        """Every topic this camera publishes has a subscriber."""
        return all(p.get_subscription_count() > 0 for p in self._publishers)

    @property
    def frames_to_subscribers(self) -> int:
        """Frames sent in a row while every topic had a subscriber (0 again whenever one had none)."""
        return self._to_subscribers

    def restart_count(self) -> None:
        self._to_subscribers = 0

    def unsubscribed(self) -> bool:
        """No topic has a subscriber (after a node stopped, until discovery notices, its subscriptions linger)."""
        return not any(p.get_subscription_count() for p in self._publishers)

    def close(self) -> None:
        self._executor.shutdown(timeout_sec=2.0)
        self._thread.join(timeout=5.0)
        self.node.destroy_node()


class FramePublisher:
    """Publishes, at `rate_hz` from its own thread, whatever each topic's maker returns for a header (None:
    nothing): malformed or unusual frames, one topic at a time."""

    def __init__(self, context: Any, rate_hz: float = 30.0, frame_id: str = "camera_optical"):
        from rclpy.node import Node

        self.node = Node(f"frame_publisher_{os.getpid()}_{id(self)}", context=context)
        self.frame_id = frame_id
        self._lock = threading.Lock()
        self._makers: dict[str, Callable[[Any], Optional[Any]]] = {}
        self._publishers: dict[str, Any] = {}
        self.published: dict[str, int] = {}
        self.node.create_timer(1.0 / rate_hz, self._tick)
        self._executor, self._thread = _spin_in_thread(self.node, context, "frame-publisher")

    def set(self, topic: str, msg_type: Any, maker: Callable[[Any], Optional[Any]]) -> None:
        from rclpy.qos import qos_profile_sensor_data

        with self._lock:
            if topic not in self._publishers:
                self._publishers[topic] = self.node.create_publisher(msg_type, topic, qos_profile_sensor_data)
            self._makers[topic] = maker
            self.published[topic] = 0

    def _tick(self) -> None:
        from std_msgs.msg import Header

        stamp = self.node.get_clock().now().to_msg()
        with self._lock:
            makers = list(self._makers.items())
        for topic, maker in makers:
            msg = maker(Header(stamp=stamp, frame_id=self.frame_id))
            if msg is not None:
                self._publishers[topic].publish(msg)
                self.published[topic] += 1

    def close(self) -> None:
        self._executor.shutdown(timeout_sec=2.0)
        self._thread.join(timeout=5.0)
        self.node.destroy_node()


# ------------------------------------------------------------------------------------------------ HTTP
@contextlib.contextmanager
def local_http_server(handler: type, **state: Any) -> Iterator[ThreadingHTTPServer]:
    """A threaded HTTP server with `handler` on 127.0.0.1 (a free port), for scripted stand-ins of an inference
    server; `state` becomes attributes of the server, which the handler reads as self.server.<name>. Shut down and
    joined on exit."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    for name, value in state.items():
        setattr(server, name, value)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# ------------------------------------------------------------------------------------------------ the client
class NodeClient:
    """~/ask (service) and ~/ask_action clients for one node, spun on the caller's thread; every wait is bounded
    and fails with WaitFailed naming what did not arrive (with the node's state and log tail when `process` is
    known), at once if the node process exits.

    With `outputs`, subscribes to the node's answer, scene_graph, markers and stats topics (and debug_image with
    `debug_image`); what arrives is kept in `answers`, `graphs`, `markers`, `stats` (the node's counters,
    published after every reply, as dicts), `debug`, newest last. A benchmark leaves them off: a subscriber makes
    the node send what it publishes.
    """

    def __init__(self, context: Any, namespace: str = DEFAULT_NAMESPACE, process: Optional[Process] = None,
                 node_name: Optional[str] = None, queue_depth: int = 100, outputs: bool = True,
                 debug_image: bool = True):
        from lifecycle_msgs.srv import ChangeState, GetState
        from rclpy.action import ActionClient
        from rclpy.node import Node
        from rclpy.qos import QoSProfile
        from sensor_msgs.msg import Image
        from std_msgs.msg import String
        from visualization_msgs.msg import MarkerArray

        from spatialthinker_ros.action import AskSpatial as AskSpatialAction
        from spatialthinker_ros.msg import SceneGraph, SpatialAnswer
        from spatialthinker_ros.ros.stats import STATS_QOS
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
        self.stats: list[dict[str, Any]] = []
        self.debug: list[Any] = []
        if outputs:
            self.node.create_subscription(SpatialAnswer, f"{self.namespace}/answer", self.answers.append, 10)
            self.node.create_subscription(SceneGraph, f"{self.namespace}/scene_graph", self.graphs.append, 10)
            self.node.create_subscription(MarkerArray, f"{self.namespace}/markers", self.markers.append, 10)
            self.node.create_subscription(String, f"{self.namespace}/stats",
                                          lambda message: self.stats.append(json.loads(message.data)), STATS_QOS)
        if outputs and debug_image:
            self.node.create_subscription(Image, f"{self.namespace}/debug_image", self.debug.append, 2)

    def wait(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        """Spin until done(); WaitFailed naming `what` when the timeout passes or the node process exits first."""
        spin_wait(self.node, done, timeout, what, self.process)

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

    def ask_until_ready(self, process: Optional[Process] = None, timeout: float = 60.0, with_depth: bool = False, by_action: bool = False,
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
