"""Child processes whose output goes to a file and which are stopped by their own pid only, the node's command
line, and bounded polling waits that fail loudly (WaitFailed) with what did not arrive. Imports no ROS."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from spatialthinker_ros.launch_config import parameter_arguments


class WaitFailed(TimeoutError):
    """A bounded wait ended without its condition: the message names what did not arrive, and why if known."""


def interruptible() -> None:
    """For a child, before it starts: SIGINT (Ctrl-C) back to its default. A process started with SIGINT ignored
    (under nohup, or by a non-interactive shell's `&`) passes that on to every child, and Python then never
    raises KeyboardInterrupt: stop() and the interrupt tests would wait in vain."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_on_sigterm() -> None:
    """SIGTERM (a `kill`, CI's `timeout`) raises KeyboardInterrupt in the main thread, as Ctrl-C does, so the
    `finally` blocks and fixtures that stop this process's children run. The children have sessions of their own
    (Process): with SIGTERM's default, this process would die alone and leave them running. Main thread only."""
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


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


def installed_executable(name: str) -> Optional[Path]:
    """One of this package's executables, as installed WITH the imported package: in bin/ of the prefix it was
    installed into (the venv of `make setup`, or a colcon workspace's install/spatialthinker_ros, where `colcon test`
    runs the tests), else beside this Python, else on PATH; None if none is found."""
    package = Path(__file__).resolve().parents[1]
    for prefix in package.parents[:5]:   # <prefix>/lib/python3.X/site-packages/spatialthinker_ros, or deeper
        if (prefix / "bin" / name).is_file():
            return prefix / "bin" / name
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return beside
    found = shutil.which(name)
    return Path(found) if found else None


def node_executable() -> list[str]:
    """What starts the node: the installed spatialthinker_node (installed_executable), else its module run by this
    Python."""
    executable = installed_executable("spatialthinker_node")
    return [str(executable)] if executable is not None else [sys.executable, "-m", "spatialthinker_ros.ros.main"]


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



def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now, for a server that must be told its port before it starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
