"""Faults the real node survives without a restart, every caller answered:

(a) its OpenAI-compatible server (a real `transformers serve`) frozen, killed mid-request and restarted;
(b) backend errors rehearsed with the replay backend's "error"/"times" lines: out of memory (retried once on a
    smaller image), a persistent error, a backend that raises;
(c) lifecycle deactivate and cleanup while requests are in flight;
(d) SIGINT and SIGTERM while requests are in flight: every caller answered, exit code 0, no traceback.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from lifecycle_msgs.msg import Transition
from transformers_serve import TransformersServe
from spatialthinker_ros.testing.fake_cameras import pattern_image
from spatialthinker_ros.testing.node_client import spin_future, spin_until
from spatialthinker_ros.testing.processes import node_command
from sensor_msgs.msg import Image
from node_requests import CALL, E, OPTIONS, QUESTION, RESPONSE

from spatialthinker_ros.ros.main import SHUTDOWN_DRAIN_S
from spatialthinker_ros.ros.node import TRANSITION_WAIT_S

from spatialthinker_ros.action import AskSpatial as AskSpatialAction
from spatialthinker_ros.srv import AskSpatial

pytestmark = pytest.mark.timeout(180)
HOLD_S = 600.0   # replay_latency with a held line: the hold's bound, reached only when a test fails before releasing


def request_image(width: int = 640, height: int = 480) -> Image:
    image = Image(width=width, height=height, encoding="rgb8", step=width * 3,
                  data=pattern_image(width, height).tobytes())
    image.header.frame_id = "request"
    return image


def requests_waiting_at(port: int) -> int:
    """Connections to 127.0.0.1:`port` holding bytes its (frozen) server has not read (/proc/net/tcp: local address
    as hex IP:PORT, then remote address, state, tx_queue:rx_queue)."""
    waiting = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        rx_queue = int(fields[4].split(":")[1], 16)
        waiting += local_port == port and rx_queue > 0
    return waiting


def three_calls_then_a_queued_goal(client, ask: AskSpatial.Request) -> tuple[list, object]:
    """Three service calls, then a goal; returns once the node holds all four: the futures of the calls and of
    the goal's result. The node takes one service's requests in order, so the reply to a fourth, invalid call
    (answered at once) proves the three before it were taken; the goal is held once the node reports it queued
    (STAGE_QUEUED feedback, sent on accepting it). Without the fourth call, a goal could overtake the calls on a
    loaded machine (another DDS writer), and a call taken only after a transition would not be pending during it."""
    services = [client.service.call_async(ask) for _ in range(3)]
    marker = spin_future(client.node, client.service.call_async(AskSpatial.Request(question=" ")), CALL)
    assert marker.error_code == E.ERROR_INVALID_REQUEST, marker.message
    stages = []
    goal = spin_future(client.node, client.action.send_goal_async(
        AskSpatialAction.Goal(question=QUESTION, image=request_image(64, 48)),
        feedback_callback=lambda message: stages.append(message.feedback.stage)), CALL)
    assert spin_until(client.node, lambda: AskSpatialAction.Feedback.STAGE_QUEUED in stages, CALL)
    return services, goal.get_result_async()


def write_replay(path: Path, *records: dict) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


# ----------------------------------------------------------------------------- (a) the inference server fails


@pytest.fixture
def server(tiny_checkpoint, tmp_path):
    s = TransformersServe(tiny_checkpoint, tmp_path)
    yield s
    s.stop()


def test_server_frozen_killed_mid_request_and_restarted(spawn, client, server, tiny_checkpoint):
    server.start()
    timeout_s = 4.0
    proc = spawn(node_command(backend="openai", server_url=f"http://127.0.0.1:{server.port}/v1", model=str(tiny_checkpoint),
                           server_timeout=timeout_s, max_new_tokens=16, use_depth=False), name="node")
    client.wait_for_service(proc)
    ask = dict(question="Where is the cup?", options=OPTIONS, image=request_image(320, 240))
    deadline = time.monotonic() + 60        # the server loads the model on its first request
    while not (response := client.ask(**ask)).success and time.monotonic() < deadline:
        pass
    assert response.success, response.message + proc.output()
    node_pid = proc.pid

    # frozen server: the request fails within its timeout
    server.signal(signal.SIGSTOP)
    started = time.monotonic()
    response = client.ask(timeout=timeout_s + 10, **ask)
    assert response.error_code == E.ERROR_BACKEND and f"did not answer within {timeout_s}" in response.message
    frozen_s = time.monotonic() - started
    assert frozen_s < timeout_s + 2.0

    # killed while a request is in flight (it has been sent to the frozen server): fails at once
    waiting = requests_waiting_at(server.port)
    future = client.service.call_async(AskSpatial.Request(**ask))
    assert spin_until(client.node, lambda: requests_waiting_at(server.port) > waiting, CALL), \
        "the request never reached the frozen server"
    assert not future.done()
    started = time.monotonic()
    server.signal(signal.SIGKILL)
    response = spin_future(client.node, future, timeout_s + 5)
    assert response.error_code == E.ERROR_BACKEND, response.message
    killed_s = time.monotonic() - started
    assert killed_s < timeout_s

    # down: fails fast, saying so
    started = time.monotonic()
    response = client.ask(**ask)
    assert response.error_code == E.ERROR_BACKEND and "not reachable" in response.message, response.message
    down_s = time.monotonic() - started
    assert down_s < 2.0

    # back on the same port: the same node answers again
    server.process.popen.wait(timeout=10)
    server.start()
    restarted, failed_after_restart = time.monotonic(), 0
    while not (response := client.ask(**ask)).success and time.monotonic() < restarted + 60:
        assert response.error_code == E.ERROR_BACKEND, response.message
        failed_after_restart += 1
    assert response.success, response.message
    print(f"\nFAULT server: frozen -> ERROR_BACKEND after {frozen_s:.2f} s (timeout {timeout_s} s); killed mid-request "
          f"-> ERROR_BACKEND after {killed_s:.2f} s; down -> after {down_s:.2f} s; restarted -> answered after "
          f"{time.monotonic() - restarted:.2f} s ({failed_after_restart} failures in between)")
    assert response.answer.model == str(tiny_checkpoint) and response.answer.raw_response
    assert proc.alive() and proc.pid == node_pid
    assert "Traceback" not in proc.output() and "unexpected" not in proc.output()


# ----------------------------------------------------------------------------- (b) backend errors, rehearsed


def test_rehearsed_backend_errors_fail_cleanly_and_the_next_request_succeeds(spawn, client, tmp_path):
    replay = write_replay(
        tmp_path / "faults.jsonl",
        {"question": "oom once?", "error": "out_of_memory", "times": 1, "response": RESPONSE},
        {"question": "oom always?", "error": "out_of_memory"},
        {"question": "down twice?", "error": "unavailable", "times": 2, "response": RESPONSE},
        {"question": "crash once?", "error": "raise", "times": 1, "response": RESPONSE},
        {"question": "slow?", "error": "timeout"},
    )
    # the model sees the frame at full size (640x480 = 307200 pixels), unless the node makes it smaller
    proc = spawn(node_command(backend="replay", replay_file=str(replay), max_input_pixels=640 * 480, use_depth=False),
                 name="node")
    client.wait_for_service(proc)

    # out of memory once: retried on a half-size image, answered; RESPONSE's boxes are in 320x240 pixels, so they
    # land at twice their size in the 640x480 frame only if the retry really used the smaller image
    response = client.ask(question="oom once?", options=OPTIONS, image=request_image())
    assert response.success, response.message
    cup = response.answer.scene_graph.objects[0]
    assert (cup.x_min, cup.y_min, cup.x_max, cup.y_max) == pytest.approx((100, 100, 200, 200))
    assert response.answer.choice == "A"
    assert spin_until(client.node, lambda: "out of memory, retrying with a smaller image" in proc.output(), 5.0)

    # out of memory every time: one retry, then ERROR_BACKEND; a small image is not retried at all
    for image in (request_image(), request_image(320, 240)):
        response = client.ask(question="oom always?", image=image)
        assert response.error_code == E.ERROR_BACKEND and "out_of_memory" in response.message, response.message
    assert proc.output().count("retrying with a smaller image") == 2

    # a server that is down, then back; a backend that raises, then recovers; a persistent timeout
    codes = [client.ask(question="down twice?", options=OPTIONS, image=request_image(320, 240)).error_code
             for _ in range(3)]
    assert codes == [E.ERROR_BACKEND, E.ERROR_BACKEND, E.ERROR_NONE]
    response = client.ask(question="crash once?", options=OPTIONS, image=request_image(320, 240))
    assert response.error_code == E.ERROR_BACKEND and "ReplayedCrash" in response.message, response.message
    assert client.ask(question="crash once?", options=OPTIONS, image=request_image(320, 240)).success
    for _ in range(2):
        response = client.ask(question="slow?", image=request_image(320, 240))
        assert response.error_code == E.ERROR_BACKEND and "replayed timeout error" in response.message
    assert proc.alive() and "unexpected" not in proc.output()


# ----------------------------------------------------------------------------- (c) lifecycle during requests


def test_deactivate_and_cleanup_during_requests_answer_every_caller_at_once(spawn, client, tmp_path):
    """The running generation is held until the test creates its release file (the replay line's until_file), so
    callers answered while it is held did not wait for it, however slow the machine."""
    release = tmp_path / "release"
    replay = write_replay(tmp_path / "replay.jsonl",
                          {"question": QUESTION, "response": RESPONSE, "until_file": str(release)})
    proc = spawn(node_command(backend="replay", replay_file=str(replay), replay_latency=HOLD_S, max_batch_size=1,
                           use_depth=False), name="node")
    client.wait_for_service(proc)
    assert spin_until(client.node, client.action.server_is_ready, CALL)
    assert client.lifecycle_state() == "active"
    client.wait(client.change_state_client.service_is_ready, CALL, "change_state")
    ask = AskSpatial.Request(question=QUESTION, options=OPTIONS, image=request_image(64, 48))
    try:
        services, result = three_calls_then_a_queued_goal(client, ask)   # the first is generating, the rest wait
        assert not any(f.done() for f in services)
        started = time.monotonic()
        assert client.change_state(Transition.TRANSITION_DEACTIVATE)
        assert spin_until(client.node, lambda: all(f.done() for f in services) and result.done(), CALL)
        print(f"\nFAULT deactivate with 4 callers pending: all answered after {time.monotonic() - started:.2f} s, "
              "the generation still held")
        assert [f.result().error_code for f in services] == [E.ERROR_NOT_ACTIVE] * 3
        assert result.result().result.error_code == E.ERROR_NOT_ACTIVE
        assert "deactivated" in services[0].result().message
        # cleanup while the abandoned generation still runs: done at once; the model is freed once it has ended
        assert client.change_state(Transition.TRANSITION_CLEANUP)
        assert client.lifecycle_state() == "unconfigured"
        client.wait(lambda: client.stats and client.stats[-1]["backend"]["state"] == "releasing", CALL,
                    "the backend to wait for its generation before it is freed")
    finally:
        release.touch()
    client.wait(lambda: client.stats and client.stats[-1]["backend"]["state"] == "released", CALL,
                "the backend to be freed once its generation ended")
    assert "backend closed" in proc.output()
    assert client.ask(question=QUESTION).error_code == E.ERROR_NOT_ACTIVE
    assert client.change_state(Transition.TRANSITION_CONFIGURE)
    assert client.change_state(Transition.TRANSITION_ACTIVATE)
    response = client.ask(question=QUESTION, options=OPTIONS, image=request_image(64, 48))
    assert response.success, response.message
    assert proc.alive()


# ----------------------------------------------------------------------------- (d) signals


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_answers_pending_callers_and_exits_cleanly(spawn, client, tmp_path, sig):
    """The running generation is held (the replay line's until_file) and never released: callers answered while
    it is held did not wait for it, and the node exits within its bounds (drain, then the wait for the model) of a
    generation that does not end."""
    ready = tmp_path / "ready"
    ready.touch()
    replay = write_replay(tmp_path / "replay.jsonl",
                          {"question": "ready?", "response": RESPONSE, "until_file": str(ready)},
                          {"question": QUESTION, "response": RESPONSE, "until_file": str(tmp_path / "never")})
    proc = spawn(node_command(backend="replay", replay_file=str(replay), replay_latency=HOLD_S, max_batch_size=1,
                           use_depth=False), name="node")
    client.wait_for_service(proc)
    assert spin_until(client.node, client.action.server_is_ready, CALL)
    ask = AskSpatial.Request(question=QUESTION, image=request_image(64, 48))
    assert client.ask(question="ready?", image=request_image(64, 48)).success
    services, result = three_calls_then_a_queued_goal(client, ask)
    assert not any(f.done() for f in services) and not result.done()

    started = time.monotonic()
    proc.popen.send_signal(sig)
    assert spin_until(client.node, lambda: all(f.done() for f in services) and result.done(), CALL), \
        "a pending caller was left waiting"
    answered_after = time.monotonic() - started
    assert [f.result().error_code for f in services] == [E.ERROR_NOT_ACTIVE] * 3
    assert "shutting down" in services[0].result().message
    assert result.result().result.error_code == E.ERROR_NOT_ACTIVE
    code = proc.popen.wait(timeout=CALL)
    exited_after = time.monotonic() - started
    assert code == 0
    bound = SHUTDOWN_DRAIN_S + TRANSITION_WAIT_S + 3.0   # the drain, the wait for the model, and a margin
    assert exited_after < bound, (answered_after, exited_after)
    print(f"\nFAULT {signal.Signals(sig).name}: 4 pending callers answered after {answered_after:.2f} s, "
          f"exit code {code} after {exited_after:.2f} s with the generation still held")
    output = proc.output()
    assert "Traceback" not in output and "Failed to publish log message" not in output, output[-3000:]
    assert "signal received" in output
    assert spin_until(client.node, lambda: not client.service.service_is_ready(), 5.0), "the service is gone"
