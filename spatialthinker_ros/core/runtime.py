"""The backend and the scheduler that feeds it, across a lifecycle: load, start answering, stop answering, close.

ROS-free: the node drives a BackendRuntime from its lifecycle callbacks. A generation that is already running
cannot be interrupted, so stopping answers every caller at once but keeps the stopped scheduler while its
worker is still inside generate(); starting again or closing first waits for that generation, and a second
worker never runs on a backend that is still generating.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Mapping, Optional, Protocol

from spatialthinker_ros.core.backends import create_backend
from spatialthinker_ros.core.backends.base import Backend
from spatialthinker_ros.core.scheduling import DEFAULT_QUEUE_SIZE, RequestScheduler, SchedulerStats

BACKEND_IDLE_WAIT_S = 600.0    # closing waits this long for a running generation by default
BACKEND_STATES = ("none", "loaded", "released")   # never loaded; loaded; closed and its memory freed


class Log(Protocol):
    """Where the runtime reports (a logging.Logger or an rclpy logger)."""

    def info(self, message: str) -> Any: ...

    def warning(self, message: str) -> Any: ...

    def error(self, message: str) -> Any: ...


class BackendRuntime:
    """One backend from load to close, and the RequestScheduler that answers with it while started.

    Not thread-safe: call it from one thread (the node's executor). `scheduler` is None while not answering.
    """

    def __init__(self, log: Log):
        self._log = log
        self.backend: Optional[Backend] = None
        self.state = "none"                                  # one of BACKEND_STATES
        self.scheduler: Optional[RequestScheduler] = None
        self._draining: Optional[RequestScheduler] = None    # stopped, but its worker may still be generating

    @property
    def model_name(self) -> Optional[str]:
        return self.backend.model_name if self.backend is not None else None

    def load(self, name: str, settings: Mapping[str, Any], wait_s: float = BACKEND_IDLE_WAIT_S) -> Backend:
        """Create the backend (create_backend's BackendError, ValueError or OSError pass up). A backend loaded before
        is closed first; ValueError while it is still generating after `wait_s`: a second model must not load on
        top of one still in use."""
        if self.backend is not None and not self.close(wait_s):
            raise ValueError("the previous backend is still generating; configure again once it has finished")
        self._log.info(f"loading backend {name} ({settings.get('model', settings.get('replay_file'))})")
        started = time.monotonic()
        self.backend = create_backend(name, **settings)
        self._log.info(f"backend ready in {time.monotonic() - started:.1f} s: model {self.backend.model_name}")
        self.state = "loaded"
        return self.backend

    def start(self, queue_size: int = DEFAULT_QUEUE_SIZE, wait_s: float = BACKEND_IDLE_WAIT_S) -> bool:
        """Start a scheduler on the loaded backend. False, and nothing started, when a generation taken before
        the last stop is still running after `wait_s` (start again once it has finished)."""
        if not self.wait_idle(wait_s):
            return False
        self.scheduler = RequestScheduler(self.backend, queue_size=queue_size)
        return True

    def stop(self, reason: str) -> bool:
        """Answer every pending request with SchedulerStopped(reason) now and refuse new ones; never blocks for
        long. Returns whether a scheduler was running."""
        if self.scheduler is None:
            return False
        # Only an idle worker is waited for (briefly): the caller sends the answers, so waiting here for a
        # running generation would hold them back.
        if not self.scheduler.stop(reason, timeout_s=0.1):
            self._draining = self.scheduler
        self._log.info(f"stopped answering ({reason}): {self.scheduler.stats()}")
        self.scheduler = None
        return True

    def wait_idle(self, timeout_s: float = BACKEND_IDLE_WAIT_S) -> bool:
        """Before the backend is closed or reused: let a generation that was already running finish.
        Returns whether the backend is idle."""
        if self._draining is not None:
            self._log.info("waiting for the running generation to finish")
            if not self._draining.stop("node deactivated", timeout_s=timeout_s):
                self._log.error(f"generation still running after {timeout_s:.0f} s")
                return False
            self._draining = None
        return True

    def close(self, wait_s: float = BACKEND_IDLE_WAIT_S) -> bool:
        """Free the model, GPU memory included (TransformersBackend.close empties the CUDA cache). A generation
        still running after `wait_s` is left to finish and the backend stays open. Safe to call more than once.
        Returns whether this call released a backend."""
        if not self.wait_idle(wait_s):
            self._log.warning("backend left open: a generation is still running")
            return False
        if self.backend is None:
            return False
        self.backend.close()
        self.backend = None
        gc.collect()
        self.state = "released"
        self._log.info("backend closed: model and its memory released")
        return True

    def stats(self) -> Optional[SchedulerStats]:
        """The running scheduler's counters, else those of the stopped one still generating, else None."""
        scheduler = self.scheduler or self._draining
        return scheduler.stats() if scheduler is not None else None
