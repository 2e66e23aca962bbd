"""Hands calls from other threads (the scheduler's) to the executor thread, so rclpy objects are only ever touched
from there."""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Callable

from rclpy.task import Future


class ExecutorHandoff:
    """Runs posted calls on the executor thread, woken through a guard condition of the node."""

    def __init__(self, node, callback_group):
        self._posted: collections.deque[Callable[[], None]] = collections.deque()
        self._wake = node.create_guard_condition(self._run_posted, callback_group=callback_group)
        self._closed = False

    def post(self, call: Callable[[], None]) -> None:
        """Run `call` on the executor thread (safe from any thread); dropped once closed."""
        if not self._closed:
            self._posted.append(call)
            self._wake.trigger()

    def close(self) -> None:
        """Drop later posts: the node is going away."""
        self._closed = True

    def done(self, future: concurrent.futures.Future) -> Future:
        """An rclpy Future that a coroutine on the executor can await: it completes there once `future` (resolved
        on any thread) is done, with `future` as its result."""
        done: Future = Future()
        future.add_done_callback(lambda finished: self.post(lambda: done.set_result(finished)))
        return done

    def _run_posted(self) -> None:
        while self._posted:
            self._posted.popleft()()
