"""Helpers for tests that run real ROS 2 processes: start/stop by pid, spin with a deadline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import rclpy
from rclpy.executors import SingleThreadedExecutor

VENV_BIN = Path(sys.executable).parent


class Process:
    """A child process whose output goes to a file, so a failing test can show it."""

    def __init__(self, args: Sequence[str], log_path: Path, env: Optional[dict] = None):
        self.args = list(args)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT,
                                      env=env or os.environ.copy(), start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGINT, timeout: float = 10.0) -> Optional[int]:
        """Ask the process (by its own pid) to stop; kill it if it does not within timeout."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=timeout)
        self._log.close()
        return self.popen.returncode


def spin_until(node, predicate: Callable[[], bool], timeout: float, executor=None) -> bool:
    """Spin `node` until predicate() is true or the timeout passes. Returns predicate()."""
    own = executor is None
    if own:
        executor = SingleThreadedExecutor(context=node.context)
        executor.add_node(node)
    deadline = time.monotonic() + timeout
    try:
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return predicate()
            executor.spin_once(timeout_sec=min(0.05, remaining))
        return True
    finally:
        if own:
            executor.remove_node(node)
            executor.shutdown()


def spin_future(node, future, timeout: float):
    """Spin until the rclpy future is done; raise TimeoutError otherwise."""
    if not spin_until(node, future.done, timeout):
        raise TimeoutError(f"no result within {timeout} s")
    return future.result()


def new_context():
    context = rclpy.Context()
    rclpy.init(context=context)
    return context
