"""OpenAI-compatible servers for tests: a real `transformers serve` of a checkpoint on 127.0.0.1, stopped by pid,
and the response writing shared by the scripted servers that play the failures a healthy server never shows."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Optional

import httpx

STARTUP_S = 90.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TransformersServe:
    """`transformers serve CHECKPOINT` on a fixed local port; can be started again after a kill.

    Requests must name the model as str(checkpoint): transformers serve only serves what it was started with.
    """

    def __init__(self, checkpoint: Path, log_dir: Path, port: Optional[int] = None):
        self.cli = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
        assert self.cli, "the transformers command line is not installed (transformers[serving] is in the lock)"
        self.checkpoint, self.log_dir, self.port = checkpoint, log_dir, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.process: Optional[subprocess.Popen] = None
        self.starts = 0

    def start(self) -> str:
        """Start and wait until /health answers; returns the /v1 URL."""
        self.starts += 1
        log_path = self.log_dir / f"serve-{self.starts}.log"
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [self.cli, "serve", str(self.checkpoint), "--host", "127.0.0.1", "--port", str(self.port),
                 "--device", "cpu"],
                stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert self.process.poll() is None, f"transformers serve exited:\n{log_path.read_text(errors='replace')}"
            assert time.monotonic() < deadline, (f"transformers serve not healthy in {STARTUP_S:.0f} s:\n"
                                                 f"{log_path.read_text(errors='replace')}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1.0).status_code == 200:
                    return self.url
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def stop(self) -> None:
        """Kill the process this object started (resuming it first if it was frozen with SIGSTOP)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
        if self.process is not None:
            self.process.wait(timeout=10)


class ScriptedHandler(BaseHTTPRequestHandler):
    """Base of a scripted HTTP server: JSON replies and server-sent events, no request logging."""

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, payload: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _events(self, events: list, pause_s: float = 0.0) -> None:
        """Each event (a str as is, else JSON) as one `data:` line; `pause_s` between them."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for event in events:
            data = event if isinstance(event, str) else json.dumps(event)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()
            time.sleep(pause_s)
