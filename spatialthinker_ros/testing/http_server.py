"""Local HTTP servers on 127.0.0.1 scripted as stand-ins of an inference server: they play the failures a healthy
server never shows. Imports no ROS."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Generic, Iterator, TypeVar

State = TypeVar("State")


class ScriptedServer(ThreadingHTTPServer, Generic[State]):
    """A threaded HTTP server whose handlers share one `state` (a test's own dataclass), read as
    self.server.state: what a scripted handler records or is told to do next."""

    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler], state: State):
        super().__init__(("127.0.0.1", 0), handler)
        self.state = state


class ScriptedHandler(BaseHTTPRequestHandler):
    """Base of a scripted handler: JSON replies and server-sent events, no request logging."""

    server: ScriptedServer[Any]

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


@contextlib.contextmanager
def local_http_server(handler: type[BaseHTTPRequestHandler], state: State) -> Iterator[ScriptedServer[State]]:
    """A ScriptedServer with `handler` on a free port of 127.0.0.1, serving on a thread; shut down and joined on
    exit."""
    server = ScriptedServer(handler, state)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
