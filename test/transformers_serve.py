"""A real `transformers serve` of a checkpoint on 127.0.0.1 for tests, run and stopped by pid with the harness's
Process (spatialthinker_ros.testing); the scripted servers are spatialthinker_ros.testing.http_server's."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Optional

import httpx

from spatialthinker_ros.testing.processes import Process, free_port, wait_for

STARTUP_S = 90.0


def healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200
    except httpx.TransportError:
        return False


class TransformersServe:
    """`transformers serve CHECKPOINT` on a fixed local port; can be started again after a kill.

    Requests must name the model as str(checkpoint): transformers serve only serves what it was started with.
    """

    def __init__(self, checkpoint: Path, log_dir: Path, port: Optional[int] = None):
        self.cli = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
        assert self.cli, "the transformers command line is not installed (transformers[serving] is in the lock)"
        self.checkpoint, self.log_dir, self.port = checkpoint, log_dir, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.process: Optional[Process] = None
        self.starts = 0

    def start(self) -> str:
        """Start and wait until /health answers; returns the /v1 URL."""
        self.starts += 1
        self.process = Process(
            [self.cli, "serve", str(self.checkpoint), "--host", "127.0.0.1", "--port", str(self.port), "--device",
             "cpu"], self.log_dir / f"serve-{self.starts}.log", env=os.environ | {"HF_HUB_OFFLINE": "1"},
            name="transformers serve")
        wait_for(lambda: healthy(self.port), STARTUP_S, f"transformers serve to answer /health on port {self.port}",
                 self.process, interval=0.2)
        return self.url

    def signal(self, sig: int) -> None:
        self.process.popen.send_signal(sig)

    def stop(self) -> None:
        """Kill the process this object started (resuming it first if it was frozen with SIGSTOP)."""
        if self.process is not None and self.process.alive():
            self.process.popen.send_signal(signal.SIGCONT)
        if self.process is not None:
            self.process.stop(signal.SIGKILL)
