"""Request scheduling between the ROS node's many concurrent callers and one model backend.

Backends are not thread-safe and a GPU runs one generate() at a time, so one worker thread owns the backend.
Callers `submit` and get a Ticket whose future is resolved exactly once: by the worker (the backend's answer),
by a watchdog thread (the deadline passed), by `Ticket.cancel`, or by `stop`. Waiting requests are bounded so
an overloaded robot answers "busy" at once instead of minutes late, and requests that arrive while the backend
is busy are batched into its next generate() call.

Threads: any thread may submit, cancel, read stats or stop. Future callbacks, `on_start` and the request's
`on_text` run without the scheduler's lock held, so they may call back into the scheduler; they run on the
scheduler's threads, so keep them short (a slow one delays other requests' answers).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Union

from spatialthinker_ros.core.backends.base import Backend
from spatialthinker_ros.core.request import ErrorCode, RequestError
from spatialthinker_ros.core.types import BackendError, BackendErrorKind, InferenceRequest, InferenceResult

_log = logging.getLogger(__name__)

TicketState = Literal["queued", "running", "done"]
_Outcome = Union[InferenceResult, Exception]

DEFAULT_QUEUE_SIZE = 8   # requests waiting for the model (node: queue_size)


class SchedulerError(RequestError):
    """Base of the scheduler's own outcomes, so callers can tell them apart from a BackendError; each carries the
    error code its caller is answered with."""


class QueueFull(SchedulerError):
    """Raised by submit when `queue_size` requests are already waiting: the caller should answer "busy"."""

    code = ErrorCode.BUSY


class SchedulerStopped(SchedulerError):
    """The scheduler was stopped (deactivate, cleanup, shutdown) before or while the request ran."""

    code = ErrorCode.NOT_ACTIVE


class RequestTimeout(SchedulerError):
    """The request's deadline passed while it waited or ran; a late backend result is discarded."""

    code = ErrorCode.TIMEOUT


class RequestCancelled(SchedulerError):
    """The caller cancelled the request."""

    code = ErrorCode.CANCELLED


@dataclass(frozen=True)
class SchedulerStats:
    """A consistent snapshot. submitted == queued + running + completed + failed + timed_out + cancelled + stopped."""

    submitted: int        # accepted by submit (rejected and post-stop submits are not counted)
    queued: int           # waiting now
    running: int          # in the batch now in flight whose callers are still waiting
    completed: int        # answered with an InferenceResult
    failed: int           # answered with a BackendError
    timed_out: int
    cancelled: int
    stopped: int          # answered with SchedulerStopped
    rejected: int         # submit raised QueueFull
    batches: int          # generate() calls made
    max_queue_depth: int  # most requests ever waiting at once


_COUNTER_BY_OUTCOME: tuple[tuple[type, str], ...] = (
    (InferenceResult, "completed"),
    (BackendError, "failed"),
    (RequestTimeout, "timed_out"),
    (RequestCancelled, "cancelled"),
    (SchedulerStopped, "stopped"),
)


class Ticket:
    """A caller's handle on one submitted request; made by RequestScheduler.submit.

    The future is put in the RUNNING state at submit, so `future.cancel()` returns False and changes nothing
    (that keeps resolution single-sourced); use `Ticket.cancel()`, which resolves it with RequestCancelled.
    """

    def __init__(
        self,
        scheduler: RequestScheduler,
        request: InferenceRequest,
        timeout_s: Optional[float],
        on_start: Optional[Callable[[], None]],
    ):
        self.request = request
        self.future: Future[InferenceResult] = Future()
        self.future.set_running_or_notify_cancel()
        self._scheduler = scheduler
        self._timeout_s = timeout_s
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._on_start = on_start
        self._state: TicketState = "queued"     # written only under the scheduler's lock
        self._backend_request = request
        on_text = request.on_text
        if on_text is not None:
            def forward_text(text: str, tokens: int) -> None:
                # A caller that already has its answer (cancelled, timed out, stopped) must see no more feedback.
                if self._state != "done":
                    on_text(text, tokens)

            self._backend_request = dataclasses.replace(request, on_text=forward_text)

    @property
    def state(self) -> TicketState:
        """"queued", "running" (handed to the backend) or "done" (the future is resolved or about to be)."""
        return self._state

    @property
    def position(self) -> Optional[int]:
        """How many requests wait ahead of this one (0: next), or None once it is no longer waiting."""
        return self._scheduler._position(self)

    def cancel(self) -> bool:
        """Resolve the future with RequestCancelled; False if it was already resolved.

        A running request cannot be pulled out of the backend's generate() call: the batch runs to its end
        and this request's result is discarded.
        """
        return self._scheduler._cancel(self)


def _log_thread_error(error: BaseException) -> None:
    _log.error("a request scheduler thread died", exc_info=error)


class RequestScheduler:
    """Queues requests from any thread and feeds them, batched, to one backend on one worker thread.

    The scheduler does not own the backend: close it after `stop()` has returned True (the worker has left
    generate()), never while a generate() may still run on the worker thread.
    """

    def __init__(self, backend: Backend, queue_size: int = DEFAULT_QUEUE_SIZE, batch_window_s: float = 0.0,
                 on_thread_error: Optional[Callable[[BaseException], None]] = None):
        """`queue_size` bounds the requests waiting (the batch in flight is not counted). With `batch_window_s`
        > 0, the worker waits up to that long for a batch to fill before calling the backend. `on_thread_error`
        is told of an exception that ended one of the scheduler's threads (a bug: every request still waiting is
        then answered with SchedulerStopped); by default it is logged."""
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        if backend.max_batch_size < 1:
            raise ValueError(f"backend.max_batch_size must be at least 1, got {backend.max_batch_size}")
        if not batch_window_s >= 0:
            raise ValueError(f"batch_window_s must be >= 0, got {batch_window_s}")
        self._backend = backend
        self._queue_size = queue_size
        self._batch_window_s = batch_window_s
        self._max_batch = backend.max_batch_size
        self._cond = threading.Condition()   # guards every field below; notified on every change
        self._queue: deque[Ticket] = deque()
        self._in_flight: list[Ticket] = []
        self._stop_reason: Optional[str] = None
        self._counts: Counter[str] = Counter()
        self._max_depth = 0
        self._on_thread_error = on_thread_error or _log_thread_error
        self._worker = threading.Thread(target=self._reporting(self._work), name="spatialthinker-scheduler",
                                        daemon=True)
        self._watchdog = threading.Thread(target=self._reporting(self._watch), name="spatialthinker-deadlines",
                                          daemon=True)
        self._worker.start()
        self._watchdog.start()

    def submit(
        self,
        request: InferenceRequest,
        timeout_s: Optional[float] = None,
        on_start: Optional[Callable[[], None]] = None,
    ) -> Ticket:
        """Queue a request; never blocks.

        `timeout_s` counts from now and covers both waiting and running; None waits as long as it takes.
        `on_start` is called on the worker thread just before the request's batch goes to the backend.
        Raises QueueFull or SchedulerStopped.
        """
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s}")
        ticket = Ticket(self, request, timeout_s, on_start)
        with self._cond:
            if self._stop_reason is not None:
                raise SchedulerStopped(self._stop_reason)
            if len(self._queue) >= self._queue_size:
                self._counts["rejected"] += 1
                raise QueueFull(f"request queue is full ({len(self._queue)} waiting)")
            self._queue.append(ticket)
            self._counts["submitted"] += 1
            self._max_depth = max(self._max_depth, len(self._queue))
            self._cond.notify_all()
        return ticket

    def stop(self, reason: str = "scheduler stopped", timeout_s: float = 5.0) -> bool:
        """Answer every waiting and running request with SchedulerStopped(reason) now, refuse new ones, and
        wait up to `timeout_s` for the threads to exit. Idempotent; later calls keep the first reason.

        Joining the threads also waits for answers they are delivering (the watchdog first: it never waits on
        the backend), so on return every accepted request's future is resolved, bar one that a concurrent
        cancel() on another thread is resolving itself.

        Returns True once the worker has exited, so the backend is idle and may be closed. False means it is
        still inside generate(), which cannot be interrupted: call stop() again later to wait more.
        """
        self._deliver(self._halt(reason))
        end = time.monotonic() + timeout_s
        for thread in (self._watchdog, self._worker):
            if thread is not threading.current_thread():     # stop() may be called from a callback
                thread.join(max(0.0, end - time.monotonic()))
        return not self._worker.is_alive()

    def stats(self) -> SchedulerStats:
        with self._cond:
            return SchedulerStats(
                submitted=self._counts["submitted"],
                queued=len(self._queue),
                running=sum(t._state == "running" for t in self._in_flight),
                completed=self._counts["completed"],
                failed=self._counts["failed"],
                timed_out=self._counts["timed_out"],
                cancelled=self._counts["cancelled"],
                stopped=self._counts["stopped"],
                rejected=self._counts["rejected"],
                batches=self._counts["batches"],
                max_queue_depth=self._max_depth,
            )

    def _reporting(self, target: Callable[[], None]) -> Callable[[], None]:
        """`target` for a thread of the scheduler: an exception that ends it goes to on_thread_error."""
        def run() -> None:
            try:
                target()
            except BaseException as error:
                self._on_thread_error(error)
        return run

    # -- resolution: decided under the lock (exactly once per ticket), delivered outside it -----------------

    def _settle_locked(self, ticket: Ticket, outcome: _Outcome) -> bool:
        """Mark the ticket done and count its outcome, unless it already was. The caller removes it from the
        queue and passes it to _deliver when this returns True."""
        if ticket._state == "done":
            return False
        ticket._state = "done"
        self._counts[next(name for kind, name in _COUNTER_BY_OUTCOME if isinstance(outcome, kind))] += 1
        return True

    def _deliver(self, settled: list[tuple[Ticket, _Outcome]]) -> None:
        """Resolve futures outside the lock: their callbacks run here and may call back into the scheduler."""
        for ticket, outcome in settled:
            if isinstance(outcome, Exception):
                ticket.future.set_exception(outcome)
            else:
                ticket.future.set_result(outcome)

    def _halt(self, reason: str) -> list[tuple[Ticket, _Outcome]]:
        with self._cond:
            if self._stop_reason is not None:
                return []
            self._stop_reason = reason
            pending = [*self._queue, *self._in_flight]
            self._queue.clear()
            settled: list[tuple[Ticket, _Outcome]] = []
            for ticket in pending:
                outcome = SchedulerStopped(reason)
                if self._settle_locked(ticket, outcome):
                    settled.append((ticket, outcome))
            self._cond.notify_all()
        return settled

    def _cancel(self, ticket: Ticket) -> bool:
        with self._cond:
            if ticket._state == "done":
                return False
            if ticket._state == "queued":
                self._queue.remove(ticket)
                outcome = RequestCancelled("request cancelled while waiting")
            else:
                outcome = RequestCancelled("request cancelled while running (its result is discarded)")
            self._settle_locked(ticket, outcome)
            self._cond.notify_all()
        self._deliver([(ticket, outcome)])
        return True

    def _position(self, ticket: Ticket) -> Optional[int]:
        with self._cond:
            return self._queue.index(ticket) if ticket._state == "queued" else None

    # -- watchdog thread: the only place requests time out, so a busy worker never delays a deadline -------

    def _watch(self) -> None:
        while True:
            with self._cond:
                if self._stop_reason is not None:
                    return
                now = time.monotonic()
                expired = self._expire_locked(now)
                if not expired:
                    deadlines = [t._deadline for t in (*self._queue, *self._in_flight)
                                 if t._deadline is not None and t._state != "done"]
                    self._cond.wait(min(min(deadlines) - now, threading.TIMEOUT_MAX) if deadlines else None)
                    continue
            self._deliver(expired)

    def _expire_locked(self, now: float) -> list[tuple[Ticket, _Outcome]]:
        settled: list[tuple[Ticket, _Outcome]] = []
        for ticket in (*self._queue, *self._in_flight):
            if ticket._deadline is not None and ticket._deadline <= now and ticket._state != "done":
                where = "waiting" if ticket._state == "queued" else "running"
                outcome = RequestTimeout(f"request timed out after {ticket._timeout_s:g} s ({where})")
                self._settle_locked(ticket, outcome)
                settled.append((ticket, outcome))
        if settled:
            self._queue = deque(t for t in self._queue if t._state != "done")
        return settled

    # -- worker thread: the only thread that touches the backend -------------------------------------------

    def _work(self) -> None:
        try:
            while (batch := self._take_batch()) is not None:
                self._run_batch(batch)
        finally:
            # Normally a no-op (already stopped). If the worker died of a bug, nobody may be left waiting.
            self._deliver(self._halt("request worker exited unexpectedly"))

    def _take_batch(self) -> Optional[list[Ticket]]:
        """Wait for work, then take up to max_batch_size requests in FIFO order; None once stopped.

        Requests past their deadline are skipped (never sent to the backend); the watchdog answers them."""
        window_end: Optional[float] = None
        with self._cond:
            while self._stop_reason is None:
                now = time.monotonic()
                ready = [t for t in self._queue if t._deadline is None or t._deadline > now]
                if not ready:
                    window_end = None
                    self._cond.wait()
                    continue
                if len(ready) < self._max_batch and self._batch_window_s > 0:
                    if window_end is None:
                        window_end = now + self._batch_window_s
                    if now < window_end:
                        self._cond.wait(window_end - now)
                        continue
                batch = ready[: self._max_batch]
                taken = set(batch)
                self._queue = deque(t for t in self._queue if t not in taken)
                for ticket in batch:
                    ticket._state = "running"
                self._in_flight = batch
                return batch
        return None

    def _run_batch(self, batch: list[Ticket]) -> None:
        for ticket in batch:
            if ticket._on_start is not None and ticket._state == "running":
                try:
                    ticket._on_start()
                except Exception:
                    _log.exception("on_start callback of request %r raised; the request runs anyway",
                                   ticket.request.request_id)
        with self._cond:
            live = [t for t in batch if t._state == "running"]     # drop those cancelled in the meantime
        outcomes = self._generate(live) if live else []
        with self._cond:
            self._in_flight = []
            self._counts["batches"] += bool(live)
            settled = [(t, o) for t, o in zip(live, outcomes) if self._settle_locked(t, o)]
            self._cond.notify_all()
        self._deliver(settled)

    def _generate(self, tickets: list[Ticket]) -> list[_Outcome]:
        """One outcome per ticket. A backend that raises or breaks its contract fails the batch, not the worker."""
        n = len(tickets)
        try:
            results = list(self._backend.generate([t._backend_request for t in tickets]))
        except Exception as exc:
            _log.exception("backend %r raised from generate() for a batch of %d", self._backend.name, n)
            # The exception text may carry internals (URLs, paths); callers get its type only.
            return [BackendError(BackendErrorKind.FAILED, f"backend failed unexpectedly ({type(exc).__name__})")
                    for _ in tickets]
        if len(results) != n:
            message = f"backend returned {len(results)} results for {n} requests"
            _log.error("backend %r: %s", self._backend.name, message)
            return [BackendError(BackendErrorKind.FAILED, message) for _ in tickets]
        outcomes: list[_Outcome] = []
        for result in results:
            if isinstance(result, (InferenceResult, BackendError)):
                outcomes.append(result)
            else:
                message = f"backend returned a {type(result).__name__} instead of a result"
                _log.error("backend %r: %s", self._backend.name, message)
                outcomes.append(BackendError(BackendErrorKind.FAILED, message))
        return outcomes
