"""Replies that reach callers who ask the moment they find the node.

rmw_fastrtps sends a reply only once the server has matched the caller's reply reader. It waits for that match
at most the reply writer's reliability `max_blocking_time` (100 ms unless a Fast DDS profile sets it) and then
drops the reply. rclpy reports the drop only as a RuntimeWarning, "failed to send response (timeout)", and
returns normally: for service replies and for action server replies, on Jazzy (rclpy 7.1) and Kilted (9.x)
alike. `wait_for_service()` only proves the caller matched the server, not the reverse, so on a loaded machine a
caller that asks at once can wait forever for an answer the node gave in milliseconds.

Here every dropped reply of the node's own services is counted (on ~/stats: ros/stats.py), logged for humans, and
sent again until it goes out, the caller is gone (rmw then drops the reply without error) or RESEND_FOR_S has passed.
rclpy's executor sends each reply with `service.send_response` and offers no hook, so each of the node's services
gets ONE wrapper on its own object (ReplyCourier.guard): the one place this package wraps an rclpy method. The
wrapper sends through the service's handle (`Service.handle.service_send_response`, what rclpy's send_response
calls) from this module, so rclpy's warning names this module as its origin, and one warnings filter whose module
pattern is this module alone turns it into an exception for the sender here to catch. No other service, node or
library in the process is touched: an unguarded service's drop stays rclpy's RuntimeWarning. rclpy's ActionServer
sends its replies itself and offers no way to see or repeat a failed send: its drops stay rclpy's RuntimeWarning,
and the shipped Fast DDS profile lets the reply writer wait longer for the caller's reader (as it does for every
first send here).
A send holds the GIL while rmw waits, so sending again from another thread would block the node just the same:
resends run on the executor thread, spaced out, each waiting at most the writer's `max_blocking_time`.
"""

from __future__ import annotations

import re
import threading
import time
import warnings
from typing import Any, Callable, Optional

from rclpy.callback_groups import CallbackGroup
from rclpy.node import Node
from rclpy.service import Service

SEND_TIMEOUT = "failed to send response (timeout)"   # rclpy's RuntimeWarning when rmw dropped a reply
# What the node's log lines (for humans) about dropped replies say; programs read the counters on ~/stats
REPLY_DELAYED = "reply not sent yet"   # a send was dropped; it is sent again
REPLY_RESENT = "reply re-sent"         # it went out on a later send
REPLY_LOST = "reply lost"              # its caller will never get it
RESEND_FOR_S = 10.0            # a caller's reply reader not matched after this is not coming: give the reply up
FIRST_RESEND_AFTER_S = 0.05    # then twice as long each time: 7 sends at most within RESEND_FOR_S

_SEND_TIMEOUT_PATTERN = re.escape(SEND_TIMEOUT)
_THIS_MODULE = re.escape(__name__) + r"\Z"   # the warnings filter's scope: sends made from this module only
_filters_lock = threading.Lock()


def _report_send_timeouts() -> None:
    """Make this module's filter the first one (process-wide warnings.filters, but it matches only warnings raised
    by this module's own sends). Checked before each send, because whoever records warnings (pytest,
    `warnings.catch_warnings`) puts filters of their own first, or restores the filters of before when done."""
    with _filters_lock:
        first = warnings.filters[0] if warnings.filters else None
        if not (first and first[0] == "error" and first[3] is not None and first[3].pattern == _THIS_MODULE
                and first[1] is not None and first[1].pattern == _SEND_TIMEOUT_PATTERN):
            warnings.filterwarnings("error", message=_SEND_TIMEOUT_PATTERN, category=RuntimeWarning,
                                    module=_THIS_MODULE)


def send_went_out(service: Service, response: Any, header: Any) -> tuple[bool, str]:
    """Send `response` as rclpy's Service.send_response(response, header) does; (False, rclpy's message) if the
    transport dropped it."""
    if not isinstance(response, service.srv_type.Response):
        raise TypeError(f"{service.srv_name}: a {type(response).__name__} is not a {service.srv_type.__name__} "
                        "response")
    request_id = getattr(header, "request_id", header)   # an rmw_service_info_t carries the rmw_request_id_t
    _report_send_timeouts()
    try:
        handle = service.handle
        with handle:   # as rclpy's send_response: the handle is not destroyed meanwhile
            handle.service_send_response(response, request_id)
    except (RuntimeWarning, SystemError) as error:
        # rclpy ignores the result of raising its warning, so Python reports a SystemError caused by the warning
        warning = error if isinstance(error, RuntimeWarning) else error.__cause__
        if isinstance(warning, RuntimeWarning) and str(warning).startswith(SEND_TIMEOUT):
            return False, str(warning)
        raise
    return True, ""


class ReplyCourier:
    """Sends a service's replies again while the transport drops them for want of the caller's reply reader.

    Resends are one-shot timers on the node's executor, so they never run beside other callbacks of the node.
    Counts (counts(), on ~/stats) go up as they happen; `on_change` is called after each change.
    """

    def __init__(self, node: Node, callback_group: Optional[CallbackGroup] = None,
                 resend_for_s: float = RESEND_FOR_S, on_change: Optional[Callable[[], None]] = None):
        self._node = node
        self._group = callback_group
        self._resend_for_s = resend_for_s
        self._on_change = on_change or (lambda: None)
        self.dropped = 0     # sends the transport refused (first sends and resends)
        self.resent = 0      # replies that went out on a resend
        self.abandoned = 0   # replies still refused after resend_for_s: their callers never get them
        self.pending = 0     # replies waiting for their next resend

    def counts(self) -> dict[str, int]:
        """What ~/stats reports as "replies"."""
        return {"dropped": self.dropped, "resent": self.resent, "abandoned": self.abandoned, "pending": self.pending}

    def guard(self, service: Service) -> Service:
        """Make `service`'s replies go through this courier. rclpy's executor sends each reply with
        `service.send_response` and offers no other hook, so that method is replaced on this one object."""
        def send_response(response, header) -> None:
            self._send(service, response, header, time.monotonic(), 0, FIRST_RESEND_AFTER_S)

        service.send_response = send_response
        return service

    def guard_all(self) -> None:
        """guard() every service the node has now (its own, and rclpy's parameter and lifecycle services)."""
        for service in self._node.services:
            self.guard(service)

    def _send(self, service: Service, response, header, first_try: float, tries: int, wait_s: float) -> None:
        name = service.srv_name
        went_out, why = send_went_out(service, response, header)
        tries += 1
        waited = time.monotonic() - first_try
        if went_out:
            if tries > 1:
                # rmw also reports success when the caller has gone meanwhile (it then drops the reply)
                self.resent += 1
                self._on_change()
                self._node.get_logger().info(f"{name}: {REPLY_RESENT} after {tries} sends ({waited:.2f} s): the "
                                             "caller's reply reader was matched late, or the caller has left")
            return
        self.dropped += 1
        if waited + wait_s > self._resend_for_s:
            self.abandoned += 1
            self._on_change()
            self._node.get_logger().error(
                f"{REPLY_LOST}: {name}: the caller's reply reader did not match in {tries} sends over "
                f"{waited:.1f} s ({why})")
            return
        if tries == 1:
            self._node.get_logger().warning(
                f"{name}: {REPLY_DELAYED}, the caller's reply reader is not matched yet ({why}); sending it again "
                f"for up to {self._resend_for_s:.0f} s")
        self._later(wait_s, lambda: self._send(service, response, header, first_try, tries, 2 * wait_s))
        self._on_change()

    def _later(self, delay_s: float, call: Callable[[], None]) -> None:
        timer = None

        def fire() -> None:
            timer.cancel()
            self._node.destroy_timer(timer)
            self.pending -= 1
            call()

        self.pending += 1
        timer = self._node.create_timer(delay_s, fire, callback_group=self._group)
