"""The backend and the scheduler that feeds it, across a lifecycle: load, start answering, stop answering, release.

ROS-free: the node drives a BackendRuntime from its lifecycle callbacks, which must answer at once. A generation
that is already running cannot be interrupted, so stopping answers every caller at once but keeps the stopped
scheduler while its worker is still inside generate(). Starting again or loading another backend waits (at most
the `wait_s` given) for that generation, so a second worker or a second model never runs beside it. Releasing never
waits: the model is freed at once when the backend is idle, else on a thread of its own once that generation ends.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any, Callable, Mapping, Optional, Protocol

from spatialthinker_ros.core.backends import create_backend
from spatialthinker_ros.core.backends.base import Backend
from spatialthinker_ros.core.scheduling import DEFAULT_QUEUE_SIZE, RequestScheduler, SchedulerStats

# never loaded; loaded; freed once the generation it is running ends; closed and its memory freed
BACKEND_STATES = ("none", "loaded", "releasing", "released")


class Log(Protocol):
    """Where the runtime reports (a logging.Logger or an rclpy logger)."""

    def info(self, message: str) -> Any: ...

    def warning(self, message: str) -> Any: ...

    def error(self, message: str) -> Any: ...


class BackendRuntime:
    """One backend from load to release, and the RequestScheduler that answers with it while started.

    Call it from one thread (the node's executor). The one other thread is a release's, which touches the backend
    only after its last generation has ended; loading joins it first. `scheduler` is None while not answering: it
    is the one record of whether requests are taken.
    """

    def __init__(self, log: Log, on_released: Callable[[], None] = lambda: None):
        """`on_released` is called once a backend has been freed: on the releasing thread when there is one."""
        self._log = log
        self._on_released = on_released
        self.backend: Optional[Backend] = None
        self.state = "none"                                  # one of BACKEND_STATES
        self.scheduler: Optional[RequestScheduler] = None
        self._draining: Optional[RequestScheduler] = None    # stopped, but its worker may still be generating
        self._releasing: Optional[threading.Thread] = None   # frees the backend once its generation has ended

    @property
    def model_name(self) -> Optional[str]:
        backend = self.backend   # a release's thread may clear it meanwhile
        return backend.model_name if backend is not None else None

    def load(self, name: str, settings: Mapping[str, Any], wait_s: float = 0.0) -> Backend:
        """Create the backend (create_backend's BackendError, ValueError or OSError pass up). A backend loaded before
        is released first; ValueError, and nothing loaded, while it is still generating after `wait_s`: a second
        model must not load beside one still in use."""
        self.release()
        if not self.wait_released(wait_s):
            raise ValueError("the previous model is still generating an answer and is freed once it has finished; "
                             "configure again then (~/stats: backend state released)")
        self._log.info(f"loading backend {name} ({settings.get('model', settings.get('replay_file'))})")
        started = time.monotonic()
        self.backend = create_backend(name, **settings)
        self._log.info(f"backend ready in {time.monotonic() - started:.1f} s: model {self.backend.model_name}")
        self.state = "loaded"
        return self.backend

    def start(self, queue_size: int = DEFAULT_QUEUE_SIZE, wait_s: float = 0.0) -> bool:
        """Start a scheduler on the loaded backend. False, and nothing started, when a generation taken before
        the last stop is still running after `wait_s` (start again once it has finished)."""
        if self._draining is not None:
            self._log.info("waiting for the running generation to finish")
            if not self._draining.stop("node deactivated", timeout_s=wait_s):
                self._log.error(f"generation still running after {wait_s:.0f} s")
                return False
            self._draining = None
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

    def release(self) -> bool:
        """Stop answering and free the model (GPU memory included) without waiting: now when the backend is idle,
        else on a thread of its own once the generation it is running has ended (state "releasing" meanwhile).
        Safe to call more than once. Returns whether this call released a backend or set its release going."""
        self.stop("backend released")
        if self.backend is None or self.state == "releasing":
            return False
        draining = self._draining
        if draining is None or draining.stop(timeout_s=0.0):
            self._close()
            return True
        self.state = "releasing"
        self._log.info("the model is freed once the generation it is running has finished")
        self._releasing = threading.Thread(target=self._close_after, args=(draining,), daemon=True,
                                           name="spatialthinker-release")
        self._releasing.start()
        return True

    def wait_released(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for a release in progress to free the model; returns whether none is left."""
        if self._releasing is not None:
            self._releasing.join(timeout_s)
            if self._releasing.is_alive():
                return False
            self._releasing = None
        return True

    def stats(self) -> Optional[SchedulerStats]:
        """The running scheduler's counters, else those of the stopped one still generating, else None."""
        scheduler = self.scheduler or self._draining
        return scheduler.stats() if scheduler is not None else None

    def _close_after(self, draining: RequestScheduler) -> None:
        draining.stop(timeout_s=threading.TIMEOUT_MAX)   # returns once its worker has left generate()
        self._close()

    def _close(self) -> None:
        """TransformersBackend.close empties the CUDA cache; the collection frees what the model still held."""
        self.backend.close()
        self.backend = None
        self._draining = None
        gc.collect()
        self.state = "released"
        self._log.info("backend closed: model and its memory released")
        self._on_released()
