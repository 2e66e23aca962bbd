"""ROS side of the bench harness: start the node / helper roles, ask the node, read role status files.

Import only after bench/_common.isolate_ros() has run (rclpy must see the isolated environment).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile

from spatialthinker_ros.launch_config import parameter_arguments
from spatialthinker_ros.srv import AskSpatial

from _common import BENCH_DIR, Children, Child, wait_for

PYTHON = sys.executable
NODE_EXECUTABLE = str(Path(sys.executable).parent / "spatialthinker_node")
ROLES = str(BENCH_DIR / "_ros_roles.py")

QUESTION = "Is the cup left or right of the plate?"
OPTIONS = ["left of", "right of"]
# A complete answer in the model's format; boxes in the pixels of the image the model is given.
RESPONSE = (
    "<observe>\nA cup and a plate on a table, a chair behind them.\n</observe>\n"
    '<scene>\n{"objects": [{"id": "cup.1", "bbox": [120, 200, 180, 280]}, '
    '{"id": "plate.1", "bbox": [300, 210, 420, 290]}, {"id": "chair.1", "bbox": [10, 150, 90, 470]}],\n'
    ' "relationships": [{"subject": "cup.1", "predicate": "left of", "object": "plate.1"}, '
    '{"subject": "chair.1", "predicate": "behind", "object": "cup.1"}]}\n</scene>\n'
    "<think>\nThe cup's box spans x 120-180 and the plate's 300-420, so the cup is left of the plate.\n</think>\n"
    "<answer> (A) left of </answer>")


def write_replay_file(directory: Path) -> Path:
    path = directory / "replay.jsonl"
    path.write_text(json.dumps({"question": QUESTION, "response": RESPONSE}) + "\n")
    return path


def node_args(**params) -> list[str]:
    return [NODE_EXECUTABLE, "--ros-args", *parameter_arguments(params)]


def probed_node_args(status: Path, **params) -> list[str]:
    """The node's own main() with a frame-count probe (bench/_node_probe.py), same parameters."""
    return [PYTHON, str(BENCH_DIR / "_node_probe.py"), str(status)] + node_args(**params)[1:]


def role_args(role: str, status: Path, **options) -> list[str]:
    args = [PYTHON, ROLES, role, "--status", str(status)]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            continue
        else:
            args += [flag, str(value)]
    return args


def read_status(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class Asker:
    """A client node in this process: calls a node's ~/ask (AskSpatial) and times the round trip."""

    def __init__(self, service: str = "/spatialthinker/ask", node_name: str = "bench_client"):
        self.node = Node(node_name)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.clients: dict[str, object] = {}
        self.default = service

    def client(self, service: Optional[str] = None):
        service = service or self.default
        if service not in self.clients:
            self.clients[service] = self.node.create_client(AskSpatial, service, qos_profile=QoSProfile(depth=100))
        return self.clients[service]

    def spin_until(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return predicate()
            self.executor.spin_once(timeout_sec=min(0.05, remaining))
        return True

    def call(self, request: AskSpatial.Request, service: Optional[str] = None, timeout: float = 30.0):
        """(response, seconds); TimeoutError after `timeout`."""
        client = self.client(service)
        started = time.perf_counter()
        future = client.call_async(request)
        if not self.spin_until(future.done, timeout):
            client.remove_pending_request(future)
            raise TimeoutError(f"no answer from {service or self.default} within {timeout} s")
        return future.result(), time.perf_counter() - started

    def wait_ready(self, proc: Child, timeout: float = 60.0, **fields) -> AskSpatial.Response:
        """Until the node answers successfully (best-effort frames may take seconds to start flowing)."""
        deadline = time.monotonic() + timeout
        client = self.client()
        if not self.spin_until(client.service_is_ready, timeout):
            raise TimeoutError(f"{self.default} not available within {timeout} s:\n{proc.output()}")
        message = "no answer"
        while True:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited:\n{proc.output()}")
            try:   # a request sent just as the service appears can go unanswered (DDS matching): retry it
                response, _ = self.call(AskSpatial.Request(**fields),
                                        timeout=min(5.0, max(1.0, deadline - time.monotonic())))
                if response.success:
                    return response
                message = response.message
            except TimeoutError as exc:
                message = str(exc)
            if time.monotonic() > deadline:
                raise TimeoutError(f"node not ready within {timeout} s: {message}\n{proc.output()}")
            self.spin_until(lambda: False, 0.2)

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()


def poke_status(path: Path, proc: Child, timeout: float = 3.0) -> dict:
    """Ask a process that writes its status on SIGUSR1 (node probe, bare subscriber) for its counts, now."""
    before = read_status(path).get("seq", 0)
    os.kill(proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = read_status(path)
        if status.get("seq", 0) > before:
            return status
        time.sleep(0.005)
    raise TimeoutError(f"{proc.name} did not write its status within {timeout} s:\n{proc.output()}")


def wait_poked(path: Path, key: str, proc: Child, timeout: float = 30.0) -> None:
    def ok() -> bool:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.output()}")
        return poke_status(path, proc).get(key, 0) >= 1
    wait_for(ok, timeout, f"{proc.name} to report {key}", interval=0.2)


def wait_status(path: Path, key: str, proc: Child, timeout: float = 30.0, at_least: int = 1) -> None:
    def ok() -> bool:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.output()}")
        return read_status(path).get(key, 0) >= at_least
    wait_for(ok, timeout, f"{proc.name} to report {key}")


__all__ = ["Asker", "Children", "NODE_EXECUTABLE", "OPTIONS", "QUESTION", "RESPONSE", "node_args", "poke_status", "probed_node_args", "read_status", "wait_poked",
           "role_args", "wait_status", "write_replay_file", "rclpy"]
