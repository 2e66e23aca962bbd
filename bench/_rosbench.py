"""ROS side of the benchmarks: the helper roles' command lines and status files, and a timed client.

Import only after spatialthinker_ros.testing.isolation.isolate_ros() has run (rclpy must see the isolated environment).
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
from rclpy.qos import QoSProfile

from spatialthinker_ros.testing.node_client import NodeClient
from spatialthinker_ros.testing.processes import Process, wait_for
from spatialthinker_ros.launch_config import parameter_arguments
from spatialthinker_ros.srv import AskSpatial

from bench._common import BENCH_DIR

PYTHON = sys.executable
# run as files: they import only rclpy and the package, nothing from bench/
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


def probed_node_args(status: Path, **params) -> list[str]:
    """The node's own main() with a frame-count probe (bench/_node_probe.py), same parameters."""
    return [PYTHON, str(BENCH_DIR / "_node_probe.py"), str(status), "--ros-args", *parameter_arguments(params)]


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


class Asker(NodeClient):
    """The harness's client of the node's ~/ask, plus clients of other AskSpatial servers (the bare floor), with
    timed calls. In the default context; it subscribes to none of the node's outputs (a subscriber makes the node
    send them, which is not what the benchmarks measure)."""

    def __init__(self, node_name: str = "bench_client"):
        super().__init__(None, node_name=node_name, outputs=False)
        self.others: dict[str, object] = {}

    def other(self, service: str):
        if service not in self.others:
            self.others[service] = self.node.create_client(AskSpatial, service, qos_profile=QoSProfile(depth=100))
        return self.others[service]

    def timed_call(self, request: AskSpatial.Request, service: Optional[str] = None,
                   timeout: float = 30.0) -> tuple[AskSpatial.Response, float]:
        """(response, seconds) from `service` (default: the node's ~/ask); WaitFailed after `timeout`."""
        started = time.perf_counter()
        response = self.call(request, timeout, None if service is None else self.other(service))
        return response, time.perf_counter() - started

    def wait_ready(self, proc: Process, timeout: float = 60.0, **fields) -> AskSpatial.Response:
        """Until the node answers successfully; RuntimeError with its log tail if it answers with an error."""
        response = self.ask_until_ready(proc, timeout=timeout, **fields)
        if not response.success:
            raise RuntimeError(f"the node answered {response.error_code}: {response.message}: {proc.describe()}")
        return response


def poke_status(path: Path, proc: Process, timeout: float = 3.0) -> dict:
    """Ask a process that writes its status on SIGUSR1 (node probe, bare subscriber) for its counts, now."""
    before = read_status(path).get("seq", 0)
    os.kill(proc.pid, signal.SIGUSR1)
    status: dict = {}

    def written() -> bool:
        status.update(read_status(path))
        return status.get("seq", 0) > before

    wait_for(written, timeout, f"{proc.name} to write its status", proc, interval=0.005)
    return status


def wait_poked(path: Path, key: str, proc: Process, timeout: float = 30.0) -> None:
    wait_for(lambda: poke_status(path, proc).get(key, 0) >= 1, timeout, f"{proc.name} to report {key}", proc,
             interval=0.2)


def wait_status(path: Path, key: str, proc: Process, timeout: float = 30.0, at_least: int = 1) -> None:
    wait_for(lambda: read_status(path).get(key, 0) >= at_least, timeout, f"{proc.name} to report {key}", proc)


__all__ = ["Asker", "OPTIONS", "QUESTION", "RESPONSE", "poke_status", "probed_node_args", "rclpy", "read_status",
           "role_args", "wait_poked", "wait_status", "write_replay_file"]
