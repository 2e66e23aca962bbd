"""Shared by the bench scripts: isolation, child processes stopped by pid, statistics, result files.

ROS-free (the GPU script imports it on machines without ROS). Import it before rclpy: `isolate_ros()` must run
before the first rclpy import so that this process and every child it starts stay on an isolated graph.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"


def isolate_ros() -> Path:
    """Localhost-only discovery, a random domain and a temporary log folder, for this process and its children.

    Returns the temporary folder (logs and scratch files); `cleanup_dir` removes it.
    """
    scratch = Path(tempfile.mkdtemp(prefix="spatialthinker-bench-"))
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ["ROS_DOMAIN_ID"] = str(random.SystemRandom().randint(1, 100))
    os.environ["ROS_LOG_DIR"] = str(scratch / "roslog")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ["PYTHONUNBUFFERED"] = "1"
    return scratch


# Fast DDS with its stock transports (UDP + 512 KB shared-memory segments) loses most best-effort 1080p frames
# here: a bare subscriber got 0-4 of 30 Hz. With the shipped 64 MB shared-memory profile it gets all 30.
LARGE_IMAGES_PROFILE = Path(__file__).resolve().parents[1] / "config" / "fastdds_large_images.xml"
DDS_TRANSPORTS = ("shm_large", "default")


def use_dds_transport(kind: str) -> None:
    """Before rclpy.init: every process of the benchmark (children inherit the environment) uses `kind`.

    shm_large: shared memory with 64 MB segments (+ UDP); default: Fast DDS as installed."""
    if kind == "shm_large":
        os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(LARGE_IMAGES_PROFILE)
    elif kind != "default":
        raise ValueError(f"unknown DDS transport {kind!r}")


def cleanup_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class Child:
    """A process this script started; its output goes to a file; stopped by its own pid only."""

    def __init__(self, args: Sequence[str], log_path: Path, name: str):
        self.name = name
        self.args = list(args)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=os.environ.copy(),
                                      start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self, tail: int = 4000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-tail:]

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        """SIGINT, then SIGKILL after `timeout`; only this pid."""
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGINT)
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=timeout)
        if not self._log.closed:
            self._log.close()
        return self.popen.returncode


class Children:
    """Context manager: every child started through it is stopped (by pid, newest first) on exit."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.started: list[Child] = []

    def start(self, args: Sequence[str], name: str) -> Child:
        child = Child(args, self.log_dir / f"{name}.log", name)
        self.started.append(child)
        return child

    def __enter__(self) -> "Children":
        return self

    def __exit__(self, *exc) -> None:
        for child in reversed(self.started):
            child.stop()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll until predicate() is true; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary_ms(seconds: Sequence[float]) -> dict:
    ms = [s * 1000.0 for s in seconds]
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
            "mean_ms": statistics.fmean(ms) if ms else float("nan"), "min_ms": min(ms) if ms else float("nan")}


def machine() -> str:
    cores = os.cpu_count()
    gpu = ""
    try:
        import torch  # noqa: PLC0415  (only when already installed; never required)

        if torch.cuda.is_available():
            gpu = f", {torch.cuda.get_device_name(0)}"
    except Exception:
        pass
    return f"{cores}-core {platform.machine()} {platform.system()}{gpu}"


def write_results(name: str, results: dict, path: Optional[str] = None) -> Path:
    """bench/results/<name>.json (git-ignored) unless a path is given; returns where it went."""
    results = {"benchmark": name, "date": datetime.date.today().isoformat(), "machine": machine(),
               "python": sys.version.split()[0], **results}
    target = Path(path) if path else RESULTS_DIR / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return target


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
