"""spatialthinker-eval --node: each row's question and image go to a running node's ~/ask service, so a
deployment is measured as deployed (its parameters, backend, queue and parser). Imported only in that mode."""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Mapping, Optional, Sequence

import rclpy
from rclpy.executors import SingleThreadedExecutor
from std_msgs.msg import Header, String

from spatialthinker_ros.core.conformal import CalibrationSetup
from spatialthinker_ros.core.pipeline import RETRIED_NO_SET
from spatialthinker_ros.core.sources import Source
from spatialthinker_ros.evaluation.data import EvalItem
from spatialthinker_ros.evaluation.runner import RowAnswer, row_answer
from spatialthinker_ros.ros.conversions import answer_from_msg, error_code_name, rgb_to_image_msg
from spatialthinker_ros.ros.stats import STATS_QOS
from spatialthinker_ros.srv import AskSpatial


class NodeError(RuntimeError):
    """The node cannot be reached."""


class NodeAnswerer:
    """Answers rows one per service call, `concurrency` calls in flight, on a private rclpy context."""

    batch_size = 1

    def __init__(self, node: str, concurrency: int, timeout_s: float, wait_s: float = 30.0):
        self.concurrency, self.timeout_s, self._wait_s = concurrency, timeout_s, wait_s
        self.service = (node if node.startswith("/") else f"/{node}").rstrip("/") + "/ask"
        self._context = rclpy.Context()
        rclpy.init(context=self._context)
        self._node = rclpy.create_node("spatialthinker_eval", context=self._context)
        self._client = self._node.create_client(AskSpatial, self.service)
        self._executor = SingleThreadedExecutor(context=self._context)
        self._executor.add_node(self._node)
        self._spinner = threading.Thread(target=self._spin, name="spatialthinker-eval-ros", daemon=True)
        self._spinner.start()
        if not self._client.wait_for_service(timeout_sec=wait_s):
            self.close()
            raise NodeError(f"no service {self.service} within {wait_s:g} s: is the node running and active?")

    def _spin(self) -> None:
        try:
            self._executor.spin()
        except Exception:   # the context was shut down under it (close)
            pass

    def answer(self, rows: Sequence[tuple[EvalItem, Source]]) -> list[RowAnswer]:
        return [self._ask(item, frame) for item, frame in rows]

    def _ask(self, item: EvalItem, frame: Source) -> RowAnswer:
        request = AskSpatial.Request(question=item.question, options=list(item.options),
                                     image=rgb_to_image_msg(frame.rgb, Header(frame_id="eval")))
        done = threading.Event()
        started = time.perf_counter()
        future = self._client.call_async(request)
        future.add_done_callback(lambda _: done.set())
        if not done.wait(self.timeout_s):
            self._client.remove_pending_request(future)
            return RowAnswer(error=f"no reply from {self.service} within {self.timeout_s:g} s",
                             latency_s=time.perf_counter() - started)
        latency = time.perf_counter() - started
        response = future.result()
        if response is None or not response.success:
            why = (f"{error_code_name(response.error_code)}: {response.message}" if response is not None
                   else "no response")
            return RowAnswer(error=f"{self.service} {why}", latency_s=latency)
        parsed, inference = answer_from_msg(response.answer)
        # the node says so only where it has a calibration (which then gives the answer no set)
        return row_answer(parsed, inference, latency, True if RETRIED_NO_SET in parsed.problems else None)

    def answering_setup(self, values: Mapping[str, Any]) -> tuple[Optional[CalibrationSetup], str]:
        """The node's own setup, as its ~/stats reports it (a latched topic): the node's parameters, not `values`,
        decide what answers."""
        topic = self.service.removesuffix("/ask") + "/stats"
        received = threading.Event()
        last: list[dict[str, Any]] = []

        def on_stats(message: String) -> None:
            last[:] = [json.loads(message.data)]
            received.set()

        subscription = self._node.create_subscription(String, topic, on_stats, STATS_QOS)
        try:
            if not received.wait(self._wait_s):
                return None, f"no {topic} message within {self._wait_s:g} s"
        finally:
            self._node.destroy_subscription(subscription)
        backend = last[0].get("backend") or {}
        if backend.get("setup") is None:
            return None, f"{topic} reports no setup: {backend.get('setup_problem') or 'no backend loaded'}"
        try:
            return CalibrationSetup(**backend["setup"]), ""
        except TypeError as exc:
            return None, f"{topic} reports a setup this version does not read ({exc})"

    def close(self) -> None:
        """Stop spinning before the node and context go: rclpy aborts the process if a spinning thread
        outlives them."""
        self._executor.shutdown(timeout_sec=5.0)
        self._spinner.join(timeout=5.0)
        self._node.destroy_node()
        self._context.try_shutdown()
