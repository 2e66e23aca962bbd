"""Replies that reach callers who ask the moment they find the node.

rmw_fastrtps sends a reply only once the server has matched the caller's reply reader. It waits for that match
at most the reply writer's reliability `max_blocking_time` (100 ms unless a Fast DDS profile sets it) and then
drops the reply. rclpy reports the drop only as a RuntimeWarning, "failed to send response (timeout)", and
returns normally: for service replies and for action server replies, on Jazzy (rclpy 7.1) and Kilted (9.x)
alike. `wait_for_service()` only proves the caller matched the server, not the reverse, so on a loaded machine a
caller that asks at once can wait forever for an answer the node gave in milliseconds.

Here every such drop is logged as what it is, and a service reply is sent again until it goes out, the caller is
gone (rmw then drops the reply without error) or RESEND_FOR_S has passed. rclpy's ActionServer sends its replies
itself and offers no way to send one again: for those (and for the first send of every reply) the shipped Fast
DDS profile lets the reply writer wait longer for the caller's reader. A send holds the GIL while rmw waits, so
sending again from another thread would block the node just the same: resends run on the executor thread, spaced
out, each waiting at most the writer's `max_blocking_time`.
"""

from __future__ import annotations

import re
import threading
import time
import warnings
from typing import Any, Callable, Optional

import rclpy.logging
from rclpy.callback_groups import CallbackGroup
from rclpy.node import Node
from rclpy.service import Service

SEND_TIMEOUT = "failed to send response (timeout)"   # rclpy's RuntimeWarning when rmw dropped a reply
# What the node's log lines about dropped replies contain
REPLY_DELAYED = "reply not sent yet"   # a send was dropped; it is sent again
REPLY_RESENT = "reply re-sent"         # it went out on a later send
REPLY_LOST = "reply lost"              # its caller will never get it
RESEND_FOR_S = 10.0            # a caller's reply reader not matched after this is not coming: give the reply up
FIRST_RESEND_AFTER_S = 0.05    # then twice as long each time: 7 sends at most within RESEND_FOR_S

_LOGGER = rclpy.logging.get_logger("spatialthinker.replies")
_SEND_TIMEOUT_PATTERN = re.escape(SEND_TIMEOUT)
_watch = threading.local()      # .watching, .failure: the send being watched on this thread, and its drop
_install_lock = threading.Lock()


def watch_send_failures() -> None:
    """Route rclpy's send-timeout warnings here, every time (Python shows a warning once per code line).

    Process-wide and idempotent. Checked again before each watched send, because whoever records warnings
    (pytest, `warnings.catch_warnings`) swaps the hook and the filters out for a while."""
    with _install_lock:
        # only when missing: changing the filters resets which other warnings were already shown once
        if not any(action == "always" and message is not None and message.pattern == _SEND_TIMEOUT_PATTERN
                   for action, message, *_ in warnings.filters):
            warnings.filterwarnings("always", message=_SEND_TIMEOUT_PATTERN, category=RuntimeWarning)
        previous = warnings.showwarning
        if getattr(previous, "routes_send_failures", False):
            return

        def showwarning(message, category, filename, lineno, file=None, line=None):
            text = str(message)
            if not (issubclass(category, RuntimeWarning) and text.startswith(SEND_TIMEOUT)):
                previous(message, category, filename, lineno, file, line)
            elif getattr(_watch, "watching", False):
                _watch.failure = text
            else:   # a send this module does not make (rclpy's action server): it can only be reported
                _LOGGER.error(f"{REPLY_LOST}: the transport dropped it and nothing sends it again ({text})")

        showwarning.routes_send_failures = True
        warnings.showwarning = showwarning


def send_went_out(send: Callable[[], Any]) -> tuple[bool, str]:
    """Run `send` (one rclpy send_response); (False, rclpy's message) if the transport dropped the reply."""
    watch_send_failures()
    _watch.watching, _watch.failure = True, None
    try:
        send()
    finally:
        _watch.watching = False
    return _watch.failure is None, _watch.failure or ""


def dropped_reply_lines(log: str) -> list[str]:
    """The lines of a node's log about replies the transport dropped: rclpy's warning and this module's lines.
    A caller waiting for a reply can stop waiting once one of them contains REPLY_LOST."""
    marks = (SEND_TIMEOUT, REPLY_DELAYED, REPLY_RESENT, REPLY_LOST)
    return [line for line in log.splitlines() if any(mark in line for mark in marks)]


class ReplyCourier:
    """Sends a service's replies again while the transport drops them for want of the caller's reply reader.

    Resends are one-shot timers on the node's executor, so they never run beside other callbacks of the node.
    """

    def __init__(self, node: Node, callback_group: Optional[CallbackGroup] = None,
                 resend_for_s: float = RESEND_FOR_S):
        self._node = node
        self._group = callback_group
        self._resend_for_s = resend_for_s
        self.dropped = 0          # sends the transport refused (first sends and resends)
        self.delivered_late = 0   # replies that went out on a resend
        self.given_up = 0         # replies still refused after resend_for_s
        self.pending = 0          # replies waiting for their next resend
        watch_send_failures()

    def guard(self, service: Service) -> Service:
        """Make `service`'s replies go through this courier. rclpy's executor sends each reply with
        `service.send_response`, and offers no other hook, so that method is replaced on this one object."""
        send = service.send_response

        def send_response(response, header) -> None:
            self._send(service.srv_name, send, response, header, time.monotonic(), 0, FIRST_RESEND_AFTER_S)

        service.send_response = send_response
        return service

    def _send(self, name: str, send, response, header, first_try: float, tries: int, wait_s: float) -> None:
        went_out, why = send_went_out(lambda: send(response, header))
        tries += 1
        waited = time.monotonic() - first_try
        if went_out:
            if tries > 1:
                # rmw also reports success when the caller has gone meanwhile (it then drops the reply)
                self.delivered_late += 1
                self._node.get_logger().info(f"{name}: {REPLY_RESENT} after {tries} sends ({waited:.2f} s): the "
                                             "caller's reply reader was matched late, or the caller has left")
            return
        self.dropped += 1
        if waited + wait_s > self._resend_for_s:
            self.given_up += 1
            self._node.get_logger().error(
                f"{REPLY_LOST}: {name}: the caller's reply reader did not match in {tries} sends over "
                f"{waited:.1f} s ({why})")
            return
        if tries == 1:
            self._node.get_logger().warning(
                f"{name}: {REPLY_DELAYED}, the caller's reply reader is not matched yet ({why}); sending it again "
                f"for up to {self._resend_for_s:.0f} s")
        self._later(wait_s, lambda: self._send(name, send, response, header, first_try, tries, 2 * wait_s))

    def _later(self, delay_s: float, call: Callable[[], None]) -> None:
        timer = None

        def fire() -> None:
            timer.cancel()
            self._node.destroy_timer(timer)
            self.pending -= 1
            call()

        self.pending += 1
        timer = self._node.create_timer(delay_s, fire, callback_group=self._group)
