"""RequestScheduler: batching, the queue bound, deadlines, cancellation, stop, and exactly-once resolution.

The backend is a fake that records its batches and blocks on command: this tests scheduling, not models
(real backends have their own tests). Every wait is bounded; WAIT_S is only reached when a test fails.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from concurrent.futures import Future, wait
from typing import Callable, Optional, Sequence, Union, cast

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_profiles import examples

from spatialthinker_ros.core.scheduling import (
    QueueFull,
    RequestCancelled,
    RequestScheduler,
    RequestTimeout,
    SchedulerStats,
    SchedulerStopped,
    Ticket,
)
from spatialthinker_ros.core.types import BackendError, BackendErrorKind, InferenceRequest, InferenceResult

pytestmark = pytest.mark.timeout(60)

WAIT_S = 5.0

_Reply = list[Union[InferenceResult, BackendError]]


def make_request(i: int, on_text: Optional[Callable[[str, int], None]] = None) -> InferenceRequest:
    return InferenceRequest(image=np.zeros((2, 2, 3), np.uint8), prompt=f"prompt {i}", question=f"q{i}",
                            on_text=on_text, request_id=str(i))


def answer_all(requests: Sequence[InferenceRequest]) -> _Reply:
    for request in requests:
        if request.on_text is not None:
            request.on_text("streamed", 1)
    return [InferenceResult(text=f"answer {r.request_id}") for r in requests]


class FakeBackend:
    """Records each batch's request ids. When gated, each generate() waits for a step() (or open())."""

    name = "fake"
    model_name = "fake-model"

    def __init__(self, max_batch_size: int = 4, gated: bool = False,
                 respond: Callable[[Sequence[InferenceRequest]], _Reply] = answer_all):
        self.max_batch_size = max_batch_size
        self.respond = respond
        self.batches: list[list[str]] = []
        self.started: queue.Queue[list[str]] = queue.Queue()   # each batch as its generate() begins
        self.finished = 0                                      # generate() calls that have returned
        self._gated = gated
        self._permits = threading.Semaphore(0)

    def step(self) -> None:
        self._permits.release()

    def open(self) -> None:
        self._gated = False
        self._permits.release(10_000)

    def generate(self, requests: Sequence[InferenceRequest]) -> _Reply:
        ids = [r.request_id for r in requests]
        self.batches.append(ids)
        self.started.put(ids)
        try:
            if self._gated and not self._permits.acquire(timeout=WAIT_S):
                raise TimeoutError("the test never released the fake backend")
            return self.respond(requests)
        finally:
            self.finished += 1

    def close(self) -> None:
        pass


def wait_until_past(deadline: float) -> None:
    """Deadlines are what these tests are about: returns once time.monotonic() has passed `deadline`."""
    threading.Event().wait(max(0.0, deadline - time.monotonic()))


def outcome(ticket: Ticket, timeout: float = WAIT_S) -> Union[InferenceResult, BaseException]:
    error = ticket.future.exception(timeout=timeout)
    return error if error is not None else ticket.future.result()


def assert_accounted(stats: SchedulerStats) -> None:
    assert stats.submitted == (stats.queued + stats.running + stats.completed + stats.failed + stats.timed_out
                               + stats.cancelled + stats.stopped)


@pytest.fixture
def thread_errors():
    """Exceptions that ended a thread (a scheduler's, through on_thread_error, or a test's own): a second resolution
    of a future raises InvalidStateError in whichever thread tried it. Fails the test on any."""
    errors: list[BaseException] = []
    yield errors
    assert not errors, [repr(error) for error in errors]


@pytest.fixture
def make(thread_errors: list[BaseException]):
    """Builds schedulers that report their threads' deaths to thread_errors; at teardown, releases their backends
    and checks the threads exit."""
    made: list[tuple[RequestScheduler, FakeBackend]] = []

    def make_(backend: Optional[FakeBackend] = None, **kwargs) -> tuple[RequestScheduler, FakeBackend]:
        backend = backend or FakeBackend()
        made.append((RequestScheduler(backend, on_thread_error=thread_errors.append, **kwargs), backend))
        return made[-1]

    yield make_
    for scheduler, backend in made:
        backend.open()
        assert scheduler.stop(timeout_s=WAIT_S)
        assert_accounted(scheduler.stats())


def test_request_runs_reports_start_and_streams(make):
    scheduler, _ = make()
    started_on: list[str] = []
    texts: list[str] = []
    ticket = scheduler.submit(make_request(0, on_text=lambda text, n: texts.append(text)),
                              on_start=lambda: started_on.append(threading.current_thread().name))
    assert outcome(ticket) == InferenceResult(text="answer 0")
    assert (ticket.state, ticket.position) == ("done", None)
    assert started_on == ["spatialthinker-scheduler"]
    assert texts == ["streamed"]
    assert scheduler.stats() == SchedulerStats(submitted=1, queued=0, running=0, completed=1, failed=0,
                                               timed_out=0, cancelled=0, stopped=0, rejected=0, batches=1,
                                               max_queue_depth=1)


def test_failing_on_start_does_not_stop_the_request(make):
    scheduler, _ = make()

    def boom() -> None:
        raise RuntimeError("feedback publisher gone")

    assert outcome(scheduler.submit(make_request(0), on_start=boom)) == InferenceResult(text="answer 0")


def test_requests_arriving_while_busy_are_batched_in_fifo_order(make):
    scheduler, backend = make(FakeBackend(max_batch_size=3, gated=True), queue_size=8)
    tickets = [scheduler.submit(make_request(0))]
    assert backend.started.get(timeout=WAIT_S) == ["0"]
    assert tickets[0].state == "running"
    tickets += [scheduler.submit(make_request(i)) for i in range(1, 8)]
    assert [t.position for t in tickets[1:]] == list(range(7))
    assert (scheduler.stats().queued, scheduler.stats().running) == (7, 1)
    backend.open()
    assert [outcome(t) for t in tickets] == [InferenceResult(text=f"answer {i}") for i in range(8)]
    assert backend.batches == [["0"], ["1", "2", "3"], ["4", "5", "6"], ["7"]]


def test_batch_window_waits_for_more_requests_but_not_for_a_full_batch(make):
    window = 1.0   # wide, so a loaded machine cannot make a full batch look as if it waited for the window
    scheduler, backend = make(FakeBackend(max_batch_size=3), batch_window_s=window)
    begin = time.monotonic()
    full = [scheduler.submit(make_request(i)) for i in range(3)]
    wait([t.future for t in full], timeout=WAIT_S)
    assert time.monotonic() - begin < window
    begin = time.monotonic()
    partial = [scheduler.submit(make_request(i)) for i in range(3, 5)]
    _, not_done = wait([t.future for t in partial], timeout=WAIT_S)
    assert not not_done, "the window's end sent the partial batch: no third request ever came"
    assert window <= time.monotonic() - begin
    assert backend.batches == [["0", "1", "2"], ["3", "4"]]


def test_queue_bound_rejects_and_counts(make):
    scheduler, backend = make(FakeBackend(max_batch_size=1, gated=True), queue_size=3)
    tickets = [scheduler.submit(make_request(0))]
    backend.started.get(timeout=WAIT_S)
    tickets += [scheduler.submit(make_request(i)) for i in range(1, 4)]   # the running one is not counted
    with pytest.raises(QueueFull, match=r"^request queue is full \(3 waiting\)$"):
        scheduler.submit(make_request(4))
    stats = scheduler.stats()
    assert (stats.rejected, stats.queued, stats.max_queue_depth, stats.submitted) == (1, 3, 3, 4)

    backend.step()
    assert backend.started.get(timeout=WAIT_S) == ["1"]   # one place freed
    tickets.append(scheduler.submit(make_request(5)))
    with pytest.raises(QueueFull):
        scheduler.submit(make_request(6))
    backend.open()
    assert all(isinstance(outcome(t), InferenceResult) for t in tickets)
    stats = scheduler.stats()
    assert (stats.completed, stats.rejected, stats.max_queue_depth) == (5, 2, 3)


def test_timeout_while_waiting_never_reaches_the_backend(make):
    scheduler, backend = make(FakeBackend(max_batch_size=1, gated=True))
    blocker = scheduler.submit(make_request(0))
    backend.started.get(timeout=WAIT_S)
    begin = time.monotonic()
    late = scheduler.submit(make_request(1), timeout_s=0.1)
    error = late.future.exception(timeout=WAIT_S)
    assert 0.1 <= time.monotonic() - begin
    assert not blocker.future.done() and backend.finished == 0, "answered at its deadline, not when the worker was free"
    assert isinstance(error, RequestTimeout) and "waiting" in str(error)
    backend.open()
    assert outcome(blocker) == InferenceResult(text="answer 0")
    assert backend.batches == [["0"]]
    assert scheduler.stats().timed_out == 1


def test_worker_never_sends_an_expired_request_even_if_the_watchdog_is_late(make):
    scheduler, backend = make(FakeBackend(max_batch_size=1, gated=True))
    blocker = scheduler.submit(make_request(0))
    backend.started.get(timeout=WAIT_S)
    hold = threading.Event()
    first_to_expire = scheduler.submit(make_request(1), timeout_s=0.05)
    first_to_expire.future.add_done_callback(lambda f: hold.wait(WAIT_S))   # runs on, and holds, the watchdog
    expired = scheduler.submit(make_request(2), timeout_s=0.1)
    submitted = time.monotonic()   # after the submit: its deadline has passed by submitted + 0.1
    assert first_to_expire.future.exception(timeout=WAIT_S) is not None   # its callback now holds the watchdog
    wait_until_past(submitted + 0.1)
    backend.step()
    assert outcome(blocker) == InferenceResult(text="answer 0")
    with pytest.raises(queue.Empty):
        backend.started.get(timeout=0.2)
    hold.set()
    assert isinstance(outcome(expired), RequestTimeout)
    assert backend.batches == [["0"]]


def test_timeout_while_running_answers_at_the_deadline_and_discards_the_late_result(make):
    scheduler, backend = make(FakeBackend(gated=True))
    begin = time.monotonic()
    ticket = scheduler.submit(make_request(0), timeout_s=0.2)
    backend.started.get(timeout=WAIT_S)
    error = ticket.future.exception(timeout=WAIT_S)
    assert 0.2 <= time.monotonic() - begin
    assert backend.finished == 0, "answered at its deadline, while generate() still ran"
    assert isinstance(error, RequestTimeout) and "running" in str(error)
    backend.open()
    assert outcome(scheduler.submit(make_request(1))) == InferenceResult(text="answer 1")  # the late batch is over
    assert ticket.future.exception() is error
    stats = scheduler.stats()
    assert (stats.timed_out, stats.completed, stats.batches) == (1, 1, 2)


def test_cancel_while_waiting(make):
    scheduler, backend = make(FakeBackend(max_batch_size=1, gated=True))
    blocker = scheduler.submit(make_request(0))
    backend.started.get(timeout=WAIT_S)
    cancelled, kept = scheduler.submit(make_request(1)), scheduler.submit(make_request(2))
    assert cancelled.cancel() is True
    assert isinstance(cancelled.future.exception(timeout=0), RequestCancelled)
    assert (cancelled.state, cancelled.position, kept.position) == ("done", None, 0)
    assert cancelled.cancel() is False
    backend.open()
    assert [outcome(blocker), outcome(kept)] == [InferenceResult(text="answer 0"), InferenceResult(text="answer 2")]
    assert backend.batches == [["0"], ["2"]]
    assert scheduler.stats().cancelled == 1


def test_cancel_while_running_discards_the_result_and_later_streaming(make):
    scheduler, backend = make(FakeBackend(gated=True))
    texts: list[str] = []
    ticket = scheduler.submit(make_request(0, on_text=lambda text, n: texts.append(text)))
    backend.started.get(timeout=WAIT_S)
    assert ticket.cancel() is True
    error = ticket.future.exception(timeout=0)
    assert isinstance(error, RequestCancelled)
    backend.open()
    assert outcome(scheduler.submit(make_request(1))) == InferenceResult(text="answer 1")
    assert ticket.future.exception() is error
    assert texts == []
    assert (scheduler.stats().cancelled, scheduler.stats().completed) == (1, 1)


def test_backend_failures_fail_their_batch_and_the_worker_keeps_serving(make):
    def raises(requests: Sequence[InferenceRequest]) -> _Reply:
        raise RuntimeError("token=hunter2")

    replies: list[Callable[[Sequence[InferenceRequest]], _Reply]] = [
        raises,
        lambda rs: [BackendError(BackendErrorKind.OUT_OF_MEMORY, "out of memory"), InferenceResult(text="ok")],
        lambda rs: [],
        lambda rs: [InferenceResult(text="ok"), cast(BackendError, "not a result")],   # breaks the contract
        answer_all,
    ]
    # a batch window longer than any test waits: each pair below always forms one batch
    scheduler, _ = make(FakeBackend(max_batch_size=2, respond=lambda rs: replies.pop(0)(rs)), batch_window_s=60)

    def pair() -> list[Union[InferenceResult, BaseException]]:
        return [outcome(t) for t in (scheduler.submit(make_request(0)), scheduler.submit(make_request(1)))]

    first = pair()
    assert all(isinstance(e, BackendError) and e.kind is BackendErrorKind.FAILED for e in first)
    assert str(first[0]) == "backend failed unexpectedly (RuntimeError)"   # no internals leak to callers
    assert first[0] is not first[1]
    oom, ok = pair()
    assert isinstance(oom, BackendError) and oom.kind is BackendErrorKind.OUT_OF_MEMORY
    assert ok == InferenceResult(text="ok")
    assert [str(e) for e in pair()] == ["backend returned 0 results for 2 requests"] * 2
    ok, bad = pair()
    assert ok == InferenceResult(text="ok") and isinstance(bad, BackendError) and "str" in str(bad)
    assert pair() == [InferenceResult(text="answer 0"), InferenceResult(text="answer 1")]
    stats = scheduler.stats()
    assert (stats.failed, stats.completed, stats.batches) == (6, 4, 5)


def test_stop_answers_everyone_at_once_and_refuses_new_requests(make):
    scheduler, backend = make(FakeBackend(max_batch_size=1, gated=True))
    tickets = [scheduler.submit(make_request(0))]
    backend.started.get(timeout=WAIT_S)
    tickets += [scheduler.submit(make_request(i)) for i in range(1, 4)]
    begin = time.monotonic()
    assert scheduler.stop("deactivating", timeout_s=0.05) is False   # the worker is still inside generate()
    assert 0.05 <= time.monotonic() - begin
    assert backend.finished == 0, "stop() gave up at its timeout, without waiting for generate() to return"
    errors = [t.future.exception(timeout=0) for t in tickets]
    assert all(isinstance(e, SchedulerStopped) and str(e) == "deactivating" for e in errors)
    with pytest.raises(SchedulerStopped, match="^deactivating$"):
        scheduler.submit(make_request(9))
    backend.open()
    assert scheduler.stop("again", timeout_s=WAIT_S) is True
    assert [t.future.exception() for t in tickets] == errors   # the late result changed nothing
    assert backend.batches == [["0"]]
    stats = scheduler.stats()
    assert (stats.stopped, stats.submitted, stats.queued, stats.running) == (4, 4, 0, 0)


def test_stop_waits_for_answers_another_thread_is_delivering(make):
    scheduler, backend = make(FakeBackend(max_batch_size=1, gated=True))
    blocker = scheduler.submit(make_request(0))   # keeps the others waiting until they expire
    backend.started.get(timeout=WAIT_S)
    watchdog_free, second_may_go, first_delivered = threading.Event(), threading.Event(), threading.Event()

    def slow_callback(future: Future) -> None:
        first_delivered.set()
        second_may_go.wait(WAIT_S)

    busy = scheduler.submit(make_request(1), timeout_s=0.02)
    busy.future.add_done_callback(lambda f: watchdog_free.wait(WAIT_S))    # so the next two expire together
    first, second = scheduler.submit(make_request(2), timeout_s=0.05), scheduler.submit(make_request(3), timeout_s=0.05)
    submitted = time.monotonic()   # after the submits: both deadlines have passed by submitted + 0.05
    first.future.add_done_callback(slow_callback)
    assert busy.future.exception(timeout=WAIT_S) is not None   # its callback now holds the watchdog
    wait_until_past(submitted + 0.05)
    backend.step()
    assert outcome(blocker) == InferenceResult(text="answer 0")   # the worker is idle: stop() need not wait for it
    watchdog_free.set()
    assert first_delivered.wait(WAIT_S)       # the watchdog has decided both, and is still delivering the first
    releaser = threading.Timer(0.1, second_may_go.set)
    releaser.start()
    scheduler.stop(timeout_s=WAIT_S)
    done_at_return = second.future.done()
    releaser.join(WAIT_S)
    assert done_at_return
    assert isinstance(second.future.exception(timeout=0), RequestTimeout)


def test_stop_from_a_callback_on_the_worker_thread_does_not_deadlock(make):
    scheduler, backend = make(FakeBackend(gated=True))
    ticket = scheduler.submit(make_request(0))
    backend.started.get(timeout=WAIT_S)
    from_callback: list[bool] = []
    called = threading.Event()

    def stop_from_callback(future: Future) -> None:
        from_callback.append(scheduler.stop("from callback", timeout_s=WAIT_S))
        called.set()

    ticket.future.add_done_callback(stop_from_callback)
    backend.open()
    assert called.wait(WAIT_S)
    assert from_callback == [False]   # the worker cannot join itself; it exits right after
    assert scheduler.stop(timeout_s=WAIT_S) is True
    assert outcome(ticket) == InferenceResult(text="answer 0")


def test_each_future_is_resolved_once_and_only_by_the_scheduler(make):
    scheduler, backend = make(FakeBackend(max_batch_size=1, gated=True))
    first, second = scheduler.submit(make_request(0)), scheduler.submit(make_request(1))
    backend.started.get(timeout=WAIT_S)
    assert second.future.cancel() is False and second.future.running()
    backend.open()
    results = [outcome(first), outcome(second)]
    assert first.cancel() is False and first.future.cancel() is False
    assert scheduler.stop(timeout_s=WAIT_S)
    assert [first.future.result(), second.future.result()] == results
    stats = scheduler.stats()
    assert (stats.completed, stats.cancelled, stats.stopped) == (2, 0, 0)


def test_an_exception_that_ends_a_scheduler_thread_goes_to_on_thread_error():
    reported: list[BaseException] = []

    def leave(requests: Sequence[InferenceRequest]) -> _Reply:
        raise SystemExit("not an Exception: generate()'s guard lets it through and the worker thread ends")

    scheduler = RequestScheduler(FakeBackend(respond=leave), on_thread_error=reported.append)
    ticket = scheduler.submit(make_request(0))
    assert isinstance(outcome(ticket), SchedulerStopped)   # answered as the worker left, not left waiting
    assert scheduler.stop(timeout_s=WAIT_S)
    assert [type(error) for error in reported] == [SystemExit]
    with pytest.raises(SchedulerStopped):
        scheduler.submit(make_request(1))


def test_invalid_settings_are_refused(make):
    with pytest.raises(ValueError):
        RequestScheduler(FakeBackend(), queue_size=0)
    with pytest.raises(ValueError):
        RequestScheduler(FakeBackend(), batch_window_s=-1.0)
    with pytest.raises(ValueError):
        RequestScheduler(FakeBackend(max_batch_size=0))
    scheduler, _ = make()
    for timeout in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            scheduler.submit(make_request(0), timeout_s=timeout)


def test_concurrent_stress_every_future_resolves_once_and_counts_add_up(make, thread_errors):
    backend_rng = random.Random(7)   # used on the worker thread only

    def flaky(requests: Sequence[InferenceRequest]) -> _Reply:
        time.sleep(backend_rng.uniform(0, 0.002))
        if backend_rng.random() < 0.05:
            raise RuntimeError("flaky backend")
        return [BackendError(BackendErrorKind.UNAVAILABLE, "down") if backend_rng.random() < 0.1
                else InferenceResult(text=r.request_id) for r in requests]

    scheduler, _ = make(FakeBackend(max_batch_size=4, respond=flaky), queue_size=8)
    total, n_threads = 500, 8
    lock = threading.Lock()
    tickets: list[tuple[Ticket, float, Optional[float]]] = []   # ticket, submitted at, timeout
    resolved_at: dict[int, list[float]] = {}
    rejected = 0

    def record_resolution(i: int) -> Callable[[Future], None]:
        return lambda future: resolved_at[i].append(time.monotonic())

    def client(k: int) -> None:
        nonlocal rejected
        rng = random.Random(k)
        for i in range(k, total, n_threads):
            timeout = rng.choice([None, None, 0.001, 0.005, 0.05])
            submitted_at = time.monotonic()
            try:
                ticket = scheduler.submit(make_request(i), timeout_s=timeout)
            except QueueFull:
                with lock:
                    rejected += 1
                continue
            resolved_at[i] = []
            ticket.future.add_done_callback(record_resolution(i))
            with lock:
                tickets.append((ticket, submitted_at, timeout))
            if rng.random() < 0.2:
                time.sleep(rng.uniform(0, 0.003))
                ticket.cancel()
            elif rng.random() < 0.3:
                time.sleep(0.0005)

    def reporting_client(k: int) -> None:
        try:
            client(k)
        except BaseException as error:
            thread_errors.append(error)

    threads = [threading.Thread(target=reporting_client, args=(k,)) for k in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert not any(thread.is_alive() for thread in threads)
    _, not_done = wait([t.future for t, _, _ in tickets], timeout=WAIT_S)
    assert not not_done

    kinds = {"completed": 0, "failed": 0, "timed_out": 0, "cancelled": 0}
    for ticket, submitted_at, timeout in tickets:
        times = resolved_at[int(ticket.request.request_id)]
        assert len(times) == 1
        result = outcome(ticket, timeout=0)
        if isinstance(result, RequestTimeout):   # never before its deadline; that it is not late, the tests above
            assert timeout is not None and times[0] - submitted_at >= timeout   # show by order of events
        if isinstance(result, InferenceResult):
            assert result.text == ticket.request.request_id
            kinds["completed"] += 1
        else:
            kinds[{BackendError: "failed", RequestTimeout: "timed_out",
                   RequestCancelled: "cancelled"}[type(result)]] += 1
    stats = scheduler.stats()
    assert {k: getattr(stats, k) for k in kinds} == kinds
    assert (stats.rejected, stats.submitted) == (rejected, len(tickets))
    assert sum(kinds.values()) + rejected == total
    assert all(kinds.values()) and rejected   # every path was exercised
    assert stats.max_queue_depth <= 8 and (stats.queued, stats.running) == (0, 0)


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.sampled_from([None, 0.002, 1.0])),
        st.tuples(st.just("cancel"), st.integers(0, 30)),
        st.tuples(st.just("complete"), st.none()),
    ),
    max_size=25,
)


@settings(max_examples=examples(40), suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS, max_batch=st.integers(1, 3), queue_size=st.integers(1, 4))
def test_no_sequence_of_submit_cancel_complete_leaves_a_future_unresolved_after_stop(thread_errors, ops, max_batch,
                                                                                      queue_size):
    backend = FakeBackend(max_batch_size=max_batch, gated=True)
    scheduler = RequestScheduler(backend, queue_size=queue_size, on_thread_error=thread_errors.append)
    tickets: list[Ticket] = []
    try:
        for op, arg in ops:
            if op == "submit":
                try:
                    tickets.append(scheduler.submit(make_request(len(tickets)), timeout_s=arg))
                except QueueFull:
                    pass
            elif op == "cancel" and tickets:
                tickets[arg % len(tickets)].cancel()
            elif op == "complete":
                backend.step()
        scheduler.stop("end of sequence", timeout_s=0.05)   # too short to wait for a held backend
        assert all(t.future.done() and t.state == "done" for t in tickets)
        results = [outcome(t, timeout=0) for t in tickets]
        stats = scheduler.stats()
        assert_accounted(stats)
        assert (stats.queued, stats.running, stats.submitted) == (0, 0, len(tickets))
    finally:
        backend.open()
        assert scheduler.stop(timeout_s=WAIT_S)
    assert [outcome(t, timeout=0) for t in tickets] == results
    assert all(len(batch) <= max_batch for batch in backend.batches)
