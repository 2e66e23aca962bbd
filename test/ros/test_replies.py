"""Replies the transport drops because the caller's reply reader is not matched: seen, sent again, bounded.

The race itself (a caller that asks before the node has matched its reply reader) could not be forced on the test
machine (bench/README.md, reply_loss). A caller whose reply reader can never match the node's reply writer makes
every send of its reply fail in rmw_fastrtps exactly as the race does: its durability (TRANSIENT_LOCAL) is more
than the node's volatile reply writer offers, while its request writer still reaches the node's request reader.
"""

import threading
import time
from typing import Optional

import pytest
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile

from spatialthinker_ros.testing.node_client import NodeStats, ReplyLost, new_context, spin_future, spin_until
from spatialthinker_ros.testing.processes import node_command
from spatialthinker_ros.ros.replies import RESEND_FOR_S, SEND_TIMEOUT, ReplyCourier, send_went_out
from spatialthinker_ros.srv import AskSpatial

UNMATCHABLE = QoSProfile(depth=10, durability=DurabilityPolicy.TRANSIENT_LOCAL)


class Server:
    """A node in its own context (its own DDS participant) answering `ask` at once, spun on its own thread."""

    def __init__(self, resend_for_s: float, guarded: bool = True, unguarded: Optional[str] = None):
        """`unguarded` names a second service, beside the first, that the courier leaves alone."""
        self.context = new_context()
        self.node = Node("reply_server", context=self.context)
        self.service = self.node.create_service(AskSpatial, "ask", self._answer)
        if unguarded:
            self.node.create_service(AskSpatial, unguarded, self._answer)
        self.courier = ReplyCourier(self.node, resend_for_s=resend_for_s)
        if guarded:
            self.courier.guard(self.service)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    @staticmethod
    def _answer(request, response):
        response.message = f"answer to {request.question}"
        return response

    def close(self):
        self.executor.shutdown(timeout_sec=5.0)
        self.thread.join(timeout=5.0)
        self.node.destroy_node()
        self.context.try_shutdown()


@pytest.fixture
def server_factory():
    servers = []

    def make(**kwargs) -> Server:
        servers.append(Server(**kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def ask_until(node, client, predicate, timeout: float) -> bool:
    """Send a request every 0.2 s until predicate(): a request sent before the client's request writer has
    matched the server is lost on the way in, and this client can never see the service as ready."""
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        client.call_async(AskSpatial.Request(question="unmatchable"))
        spin_until(node, predicate, 0.2)
    return predicate()


def test_rclpy_reports_a_dropped_reply_only_as_a_warning_and_send_went_out_sees_every_one(ros_context,
                                                                                        server_factory):
    server = server_factory(resend_for_s=0.0, guarded=False)
    outcomes = []

    def send_response(response, header, service=server.service):
        outcomes.append(send_went_out(service, response, header))

    server.service.send_response = send_response
    caller = Node("unmatchable_caller", context=ros_context)
    client = caller.create_client(AskSpatial, "ask", qos_profile=UNMATCHABLE)
    # rclpy's own warning is shown once per process; every drop must be seen, so wait for two
    assert ask_until(caller, client, lambda: len(outcomes) >= 2, 30.0)
    assert all(not went_out and SEND_TIMEOUT in why for went_out, why in outcomes)
    caller.destroy_node()


def test_a_service_left_unguarded_beside_a_guarded_one_keeps_rclpys_behaviour(ros_context, server_factory,
                                                                               recwarn):
    """The courier's warnings filter matches only its own sends: a service it does not guard, in the same process
    and executor, still gets rclpy's RuntimeWarning for a dropped reply and goes on answering (a process-wide
    filter made that service's send raise SystemError in the executor, which then stopped)."""
    server = server_factory(resend_for_s=60.0, unguarded="ask_plain")
    caller = Node("unmatchable_caller", context=ros_context)
    guarded = caller.create_client(AskSpatial, "ask", qos_profile=UNMATCHABLE)
    plain = caller.create_client(AskSpatial, "ask_plain", qos_profile=UNMATCHABLE)
    assert ask_until(caller, guarded, lambda: server.courier.dropped >= 1, 30.0), "the guarded drop is seen"
    rclpy_warned = lambda: any(SEND_TIMEOUT in str(w.message) for w in recwarn.list)
    assert ask_until(caller, plain, rclpy_warned, 30.0), "rclpy warns of the unguarded service's drop"
    good = Node("good_caller", context=ros_context)
    good_client = good.create_client(AskSpatial, "ask_plain")
    assert spin_until(good, good_client.service_is_ready, 30.0)
    future = good_client.call_async(AskSpatial.Request(question="good"))
    assert spin_until(good, future.done, 10.0), "the executor stopped after the unguarded service's dropped reply"
    assert future.result().message == "answer to good" and server.thread.is_alive()
    assert server.courier.dropped >= 1 and server.courier.abandoned == 0
    caller.destroy_node()
    good.destroy_node()


def test_a_dropped_reply_is_sent_again_without_holding_up_other_callers_and_stops_when_its_caller_leaves(
        ros_context, server_factory):
    server = server_factory(resend_for_s=60.0)
    courier = server.courier
    bad = Node("unmatchable_caller", context=ros_context)
    bad_client = bad.create_client(AskSpatial, "ask", qos_profile=UNMATCHABLE)
    assert ask_until(bad, bad_client, lambda: courier.dropped >= 1, 30.0)
    assert spin_until(bad, lambda: courier.dropped >= 3, 10.0), "the dropped reply was not sent again"
    assert courier.pending >= 1 and courier.abandoned == 0

    good = Node("good_caller", context=ros_context)
    good_client = good.create_client(AskSpatial, "ask")
    assert spin_until(good, good_client.service_is_ready, 30.0)
    future = good_client.call_async(AskSpatial.Request(question="good"))
    began = time.monotonic()
    assert spin_until(good, future.done, 10.0), "a matched caller waited while another caller's reply was retried"
    assert future.result().message == "answer to good"
    answered_in = time.monotonic() - began

    bad.destroy_node()   # rmw now reports the caller gone, and drops its reply without error
    assert spin_until(good, lambda: courier.pending == 0, 30.0), "resends went on after the caller left"
    assert courier.abandoned == 0
    assert answered_in < 5.0
    good.destroy_node()


def test_a_reply_whose_caller_never_matches_is_given_up_within_its_bound(ros_context, server_factory):
    server = server_factory(resend_for_s=1.0)
    courier = server.courier
    bad = Node("unmatchable_caller", context=ros_context)
    client = bad.create_client(AskSpatial, "ask", qos_profile=UNMATCHABLE)
    assert ask_until(bad, client, lambda: courier.dropped >= 1, 30.0)
    began = time.monotonic()
    assert spin_until(bad, lambda: courier.abandoned >= 1 and courier.pending == 0, 10.0)
    assert time.monotonic() - began < 5.0
    assert courier.resent == 0
    bad.destroy_node()


def test_the_node_counts_a_reply_the_transport_dropped_keeps_answering_and_the_test_helper_fails_fast_on_a_loss(
        spawn, ros_context, tmp_path):
    replay = tmp_path / "replay.jsonl"
    replay.touch()
    proc = spawn(node_command(backend="replay", replay_file=str(replay)), name="node")
    good = Node("good_caller", context=ros_context)
    good_client = good.create_client(AskSpatial, "/spatialthinker/ask")
    assert spin_until(good, good_client.service_is_ready, 60.0), proc.output()
    bad = Node("unmatchable_caller", context=ros_context)
    bad_client = bad.create_client(AskSpatial, "/spatialthinker/ask", qos_profile=UNMATCHABLE)
    stats = NodeStats(bad)
    assert ask_until(bad, bad_client, lambda: stats.replies("dropped") >= 1 and stats.replies("pending") >= 1,
                     60.0), proc.output()
    future = good_client.call_async(AskSpatial.Request(question="Where is the cup?"))
    assert spin_until(good, future.done, 10.0), proc.output()
    assert future.result().error_code == AskSpatial.Response.ERROR_NO_IMAGE
    assert stats.replies("abandoned") == 0   # not yet: it is being sent again
    # the reply the unmatchable caller waits for is given up after RESEND_FOR_S: the helper says so at once
    began = time.monotonic()
    with pytest.raises(ReplyLost, match="reply lost"):
        spin_future(bad, bad_client.call_async(AskSpatial.Request(question="lost")), 60.0, process=proc, stats=stats)
    assert time.monotonic() - began < RESEND_FOR_S + 5.0
    bad.destroy_node()
    good.destroy_node()
