"""spatialthinker_node's entry point: runs the node until SIGINT or SIGTERM, answering pending callers first."""

from __future__ import annotations

import signal
import threading
import time
from typing import Callable, Optional

import rclpy
import rclpy.logging
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.signals import SignalHandlerOptions

from spatialthinker_ros.ros.camera_inputs import keep_freed_frame_memory
from spatialthinker_ros.ros.node import SpatialThinkerNode

SHUTDOWN_DRAIN_S = 2.0         # on SIGINT/SIGTERM, time for the answers to pending callers to go out
SPIN_PERIOD_S = 0.1            # the executor wakes at least this often, so a signal is seen promptly


def main(args=None, on_node: Optional[Callable[[SpatialThinkerNode], None]] = None) -> int:
    """Runs the node until SIGINT or SIGTERM; exits 0 then (1 when the parameters or configure fail). `on_node` is
    given the node once it exists (a benchmark's read-only probe of its counters).

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
        if on_node is not None:
            on_node(node)
        if node.get_parameter("keep_frame_memory").value:   # before any frame arrives; ~/stats reports it too
            node.get_logger().debug(keep_freed_frame_memory())
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
