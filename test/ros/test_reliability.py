"""Bad input never takes the real node down, and never leaves a caller waiting or silently wrong.

- Bad requests: each gets its documented error code (the cases test_node.py does not already cover), and
  hypothesis-generated requests go to one long-lived node that must answer every one, in bounded time, validly.
- Bad camera data: dropped with a throttled warning (a handful of lines for ~90 bad frames), while the node keeps
  answering; the next good frame is answered.
"""

from __future__ import annotations

import itertools
import json
import time

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis_profiles import examples
from rclpy.qos import QoSProfile
from spatialthinker_ros.testing.fake_cameras import FakeCamera, pattern_image
from spatialthinker_ros.testing.node_client import NodeClient, new_context, spin_until
from spatialthinker_ros.testing.processes import Process, node_command
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header
from spatialthinker_ros.ros.throttle import WARN_THROTTLE_S
from spatialthinker_ros.srv import AskSpatial
from node_requests import CALL, E, OPTIONS, QUESTION, RESPONSE, replay_params

pytestmark = pytest.mark.timeout(180)

SERVICE_CODES = {E.ERROR_NONE, E.ERROR_INVALID_REQUEST, E.ERROR_NO_IMAGE, E.ERROR_STALE_IMAGE, E.ERROR_UNKNOWN_CAMERA,
                 E.ERROR_BUSY, E.ERROR_BACKEND, E.ERROR_TIMEOUT}
MAX_MESSAGE = 1000          # no error message may grow with what the caller sent
THROTTLE_WINDOW_S = 3.0     # bad frames at 30 Hz for this long: ~90 frames


def rgb_image(width: int, height: int, encoding: str = "rgb8", **fields) -> Image:
    channels = {"rgb8": 3, "bgr8": 3, "mono8": 1}[encoding]
    data = pattern_image(width, height)[:, :, :channels].tobytes()
    return Image(width=width, height=height, encoding=encoding, step=width * channels, data=data, **fields)


def log_count(proc: Process, start: int, text: str) -> int:
    """Lines of the node's log after character `start` that contain `text`."""
    return sum(text in line for line in proc.output()[start:].splitlines())


def warnings_allowed(since: float, keys: int) -> int:
    """The most throttled warnings `keys` throttle keys can log from `since` until now, however long a loaded
    machine took: one per key and throttle period."""
    return keys * (1 + int((time.monotonic() - since) // WARN_THROTTLE_S))


# ----------------------------------------------------------------------------- fixed bad requests


def test_bad_requests_get_their_error_code_and_a_bounded_message(spawn, client, camera, replay_file):
    camera(width=320, height=240)
    proc = spawn(node_command(**replay_params(replay_file, max_question_chars=100, max_request_image_pixels=100_000)),
                 name="node")
    assert client.ask_until_ready(proc, question=QUESTION, options=OPTIONS).success
    invalid, camera_code = E.ERROR_INVALID_REQUEST, E.ERROR_UNKNOWN_CAMERA
    huge = 2**32 - 1
    cases = [
        # questions: unicode whitespace only, huge unicode, a valid question padded past the cap with whitespace
        (dict(question="\u3000\t \u2003\n"), invalid, "empty"),
        (dict(question="\U0001F916" * 1_000_000), invalid, "at most 100"),
        (dict(question=" " * 500_000 + QUESTION), invalid, "with its whitespace"),
        # options: far too many, whitespace-only, too long (also when the length is whitespace)
        (dict(question=QUESTION, options=["x"] * 5000), invalid, "at most 26"),
        (dict(question=QUESTION, options=["left of", " \t "]), invalid, "option B is empty"),
        (dict(question=QUESTION, options=["y" * 201]), invalid, "at most 200"),
        (dict(question=QUESTION, options=["left of" + " " * 100_000]), invalid, "with its whitespace"),
        # a camera name of 100 kB: refused, and not echoed back whole
        (dict(question=QUESTION, camera="c" * 100_000), camera_code, "100000 characters"),
        (dict(question=QUESTION, max_image_age=float("nan")), invalid, "max_image_age"),
        (dict(question=QUESTION, max_image_age=float("inf")), invalid, "max_image_age"),
        # request images
        (dict(question=QUESTION, image=Image(width=0, height=0, encoding="rgb8", step=0, data=bytes(12))),
         invalid, "zero size"),
        (dict(question=QUESTION, image=Image(width=4, height=0, encoding="rgb8", step=12, data=bytes(12))),
         invalid, "zero size"),
        (dict(question=QUESTION, image=Image(width=4, height=4, encoding="rgb8", step=8, data=bytes(32))),
         invalid, "step 8 is smaller"),
        (dict(question=QUESTION, image=Image(width=4, height=4, encoding="mono8", step=4, data=bytes(48))),
         invalid, "data holds 48 bytes"),   # rgb8 data labelled mono8: more data is as wrong as less
        (dict(question=QUESTION, image=Image(width=huge, height=huge, encoding="rgb8", step=huge, data=bytes(3))),
         invalid, "exceeds the 100000-pixel limit"),
        (dict(question=QUESTION, image=rgb_image(400, 300)), invalid, "exceeds the 100000-pixel limit"),
        (dict(question=QUESTION, image=Image(width=64, height=48, encoding="rgb8", step=192)), invalid, "data holds 0"),
        (dict(question=QUESTION, image=Image(width=4, height=4, encoding="e" * 100_000, step=12, data=bytes(48))),
         invalid, "unsupported encoding"),
        (dict(question=QUESTION, image=rgb_image(4000, 2)), invalid, "200:1"),
        (dict(question=QUESTION, image=rgb_image(32, 24, header=Header(frame_id="f" * 300))), invalid, "frame_id"),
    ]
    for fields, code, text in cases:
        response = client.ask(**fields)
        brief = {k: (v if len(str(v)) < 80 else f"{str(v)[:60]}...") for k, v in fields.items()}
        assert (response.success, response.error_code) == (False, code), (brief, response.message)
        assert text in response.message, (brief, text, response.message)
        assert len(response.message) <= MAX_MESSAGE, (brief, len(response.message))
    # the edges that are fine: 1x1, exactly 200:1, mono with row padding
    for image in (rgb_image(1, 1), rgb_image(200, 1),
                  Image(width=5, height=3, encoding="mono8", step=8, data=bytes(range(24)))):
        response = client.ask(question=QUESTION, options=OPTIONS, image=image)
        assert response.success, (image.width, image.height, response.message)
        assert response.answer.scene_graph.image_width == image.width
    # a flood of bad requests does not flood the log: failure warnings are throttled per error code
    start = len(proc.output())
    burst = client.node.create_client(AskSpatial, "/spatialthinker/ask", qos_profile=QoSProfile(depth=1000))
    assert spin_until(client.node, burst.service_is_ready, CALL)
    began = time.monotonic()
    futures = [burst.call_async(AskSpatial.Request(question=" ")) for _ in range(500)]
    assert spin_until(client.node, lambda: all(f.done() for f in futures), CALL)
    assert {f.result().error_code for f in futures} == {invalid}
    allowed = warnings_allowed(began, keys=1)
    assert log_count(proc, start, "failed: the question is empty") <= allowed, proc.output()[start:][-3000:]
    assert proc.alive() and "unexpected" not in proc.output(), proc.output()[-3000:]


# ----------------------------------------------------------------------------- property-based requests

FUZZ_MAX_QUESTION = 500
FUZZ_BOUND_S = 15.0
ENCODINGS = ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "8UC1", "8UC3", "mono16", "16UC1", "32FC1", "yuv422", ""]
LAYOUT = {"rgb8": (3, 1), "bgr8": (3, 1), "rgba8": (4, 1), "bgra8": (4, 1), "mono8": (1, 1), "8UC1": (1, 1),
          "8UC3": (3, 1), "mono16": (1, 2)}
no_nul = st.characters(codec="utf-8", exclude_characters="\x00")   # ROS strings are UTF-8; a NUL would end one


@st.composite
def consistent_images(draw) -> Image:
    """Images the node must accept (bar size limits): layouts that agree with their data."""
    encoding = draw(st.sampled_from(sorted(LAYOUT)))
    channels, itemsize = LAYOUT[encoding]
    width, height = draw(st.integers(1, 96)), draw(st.integers(1, 72))
    step = width * channels * itemsize + draw(st.integers(0, 7))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return Image(width=width, height=height, encoding=encoding, step=step, is_bigendian=draw(st.integers(0, 1)),
                 data=rng.integers(0, 256, step * height, dtype=np.uint8).tobytes(),
                 header=Header(frame_id=draw(st.text(no_nul, max_size=20))))


@st.composite
def inconsistent_images(draw) -> Image:
    """Any field values: sizes small or absurd, steps and data lengths that need not agree, any encoding."""
    size = st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1))
    return Image(width=draw(size), height=draw(size), step=draw(size),
                 encoding=draw(st.one_of(st.sampled_from(ENCODINGS), st.text(no_nul, max_size=40))),
                 is_bigendian=draw(st.integers(0, 255)), data=draw(st.binary(max_size=4096)),
                 header=Header(frame_id=draw(st.text(no_nul, max_size=300))))


def repeated(piece, low: int, high: int):
    """Huge strings, cheaply: a short piece repeated."""
    return st.builds(lambda text, n: text * n, piece, st.integers(low, high))


questions = st.one_of(
    st.just(QUESTION),
    st.text(no_nul, max_size=FUZZ_MAX_QUESTION + 20),
    repeated(st.text(no_nul, min_size=1, max_size=4), 100, 400_000),
    st.builds(lambda pad: pad + QUESTION + pad, repeated(st.sampled_from([" ", "\n", "\u3000"]), 1, 300_000)),
)
requests = st.fixed_dictionaries({
    "question": questions,
    "options": st.one_of(st.just([]), st.just(OPTIONS), st.lists(st.text(no_nul, max_size=250), max_size=40),
                         st.lists(repeated(st.just(" "), 1, 50_000), max_size=3)),
    "camera": st.one_of(st.just(""), st.just("default"), st.text(no_nul, max_size=60),
                        repeated(st.just("c"), 1000, 200_000)),
    "image": st.one_of(st.just(None), consistent_images(), inconsistent_images(),
                       st.just(rgb_image(1024, 1024)), st.just(rgb_image(1, 1))),
    "scene_only": st.booleans(),
    "max_image_age": st.one_of(st.just(0.0), st.floats(allow_nan=True, allow_infinity=True)),
})


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    """ONE node for every generated request, with a camera streaming colour + depth."""
    tmp = tmp_path_factory.mktemp("fuzz")
    replay = tmp / "replay.jsonl"
    replay.write_text(json.dumps({"question": QUESTION, "response": RESPONSE}) + "\n")
    context = new_context()
    # Its own namespace: this node and camera live on until the module ends, and must not feed later tests' nodes.
    cam = FakeCamera(context, prefix="fuzz/", width=320, height=240, rate_hz=15.0,
                         depth_m=np.full((240, 320), 2.0, np.float32),
                         k=[250.0, 0.0, 160.0, 0.0, 250.0, 120.0, 0.0, 0.0, 1.0])
    proc = Process(node_command("-r", "__ns:=/fuzz", **replay_params(replay, max_question_chars=FUZZ_MAX_QUESTION,
                                                                     max_image_age=0.0)), tmp / "node.log")
    client_ = NodeClient(context, namespace="/fuzz/spatialthinker")
    try:
        assert client_.ask_until_ready(proc, question=QUESTION, options=OPTIONS).success, proc.output()
        yield client_, proc
    finally:
        client_.close()
        cam.close()
        code = proc.stop()
        context.try_shutdown()
    assert code == 0, proc.output()[-3000:]


@settings(max_examples=examples(300),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(fields=requests)
def test_generated_requests_are_each_answered_validly_in_bounded_time(fuzz, fields):
    client_, proc = fuzz
    image = fields.pop("image")
    if image is not None:
        fields["image"] = image
    started = time.monotonic()
    response = client_.ask(timeout=FUZZ_BOUND_S, **fields)   # raises TimeoutError: a caller left hanging
    elapsed = time.monotonic() - started
    event(f"error_code {response.error_code}")
    assert response.error_code in SERVICE_CODES, response
    assert response.success == (response.error_code == E.ERROR_NONE), response.message
    if response.success:
        assert response.message == "" and response.answer.request_id
        assert response.answer.question == fields["question"] and list(response.answer.options) == fields["options"]
    else:
        assert response.message and len(response.message) <= MAX_MESSAGE, len(response.message)
    assert elapsed < FUZZ_BOUND_S
    assert proc.alive(), proc.output()[-3000:]


def test_the_fuzzed_node_still_answers_and_logged_no_internal_error(fuzz):
    client_, proc = fuzz
    response = client_.ask(question=QUESTION, options=OPTIONS)
    assert response.success and response.answer.choice == "A", response.message
    assert response.answer.scene_graph.objects[0].has_position, "depth still paired"
    output = proc.output()
    assert "unexpected" not in output and "Traceback" not in output, output[-3000:]


# ----------------------------------------------------------------------------- bad camera data


def colour(width=320, height=240):
    data = pattern_image(width, height).tobytes()
    return lambda header: Image(header=header, width=width, height=height, encoding="rgb8", step=width * 3, data=data)


def depth(width=320, height=240, encoding="32FC1", metres=2.0):
    data = np.full((height, width), metres, np.float32).tobytes()
    return lambda header: Image(header=header, width=width, height=height, encoding=encoding, step=width * 4,
                                data=data)


def info(k=(250.0, 0.0, 160.0, 0.0, 250.0, 120.0, 0.0, 0.0, 1.0), width=320, height=240):
    return lambda header: CameraInfo(header=header, width=width, height=height, k=list(k))


def ask_during(client_, frames, seconds: float, frames_between: int = 3, topic: str = "image",
               min_frames: int = 60, min_responses: int = 0, **fields) -> list:
    """Ask repeatedly while bad frames go out for `seconds` (the throttle window under test), each question after
    `frames_between` more frames on `topic` were sent; every response. A loaded machine publishes and answers more
    slowly, so it goes on until at least `min_frames` were sent and `min_responses` answered."""
    responses, first = [], frames.published[topic]
    now = time.monotonic()
    end, limit = now + seconds, now + CALL
    while time.monotonic() < end or frames.published[topic] - first < min_frames or len(responses) < min_responses:
        assert time.monotonic() < limit, f"{len(responses)} answers, {frames.published[topic] - first} frames"
        responses.append(client_.ask(**fields))
        sent = frames.published[topic]
        assert spin_until(client_.node, lambda: frames.published[topic] >= sent + frames_between, CALL)
    return responses


def assert_throttled(proc, start: int, since: float, text: str) -> None:
    """A camera warning: a text can reach the log by two keys (a frame's arrival checks, and its decoding)."""
    count, allowed = log_count(proc, start, text), warnings_allowed(since, keys=2)
    assert 1 <= count <= allowed, f"{count} warnings '{text}' (at most {allowed}):\n{proc.output()[start:][-3000:]}"


def test_bad_camera_data_is_dropped_with_throttled_warnings_while_serving(spawn, client, frames, replay_file):
    proc = spawn(node_command(**replay_params(replay_file, max_image_age=1.0)), name="node")
    frames.set("image", Image, colour())
    frames.set("depth", Image, depth())
    frames.set("camera_info", CameraInfo, info())
    response = client.ask_until_ready(proc, with_depth=True, question=QUESTION, options=OPTIONS)
    assert response.success and response.answer.scene_graph.objects[0].has_position, response.message

    # depth in an unexpected encoding, CameraInfo with zero focal length: answers go on, without 3D
    start, since = len(proc.output()), time.monotonic()
    frames.set("depth", Image, depth(encoding="rgb8"))
    frames.set("camera_info", CameraInfo, info(k=[0.0] * 9))
    responses = ask_during(client, frames, THROTTLE_WINDOW_S, question=QUESTION, options=OPTIONS)
    assert all(r.success for r in responses), [r.message for r in responses if not r.success]
    assert not responses[-1].answer.scene_graph.objects[0].has_position, "no depth frame fits: no 3D"
    assert_throttled(proc, start, since, "depth dropped: depth unsupported encoding 'rgb8'")
    assert_throttled(proc, start, since, "CameraInfo ignored: focal lengths must be positive")

    # colour stamps going backwards (every other frame 0.5 s older): the newer frame is kept and answered on
    start, since = len(proc.output()), time.monotonic()
    sent_backwards: set = set()
    flip = itertools.count()

    def backwards(header: Header) -> Image:
        msg = colour()(header)
        if next(flip) % 2:
            msg.header.stamp.sec -= 1
            sent_backwards.add((msg.header.stamp.sec, msg.header.stamp.nanosec))
        return msg

    frames.set("depth", Image, depth())
    frames.set("camera_info", CameraInfo, info())
    frames.set("image", Image, backwards)
    responses = ask_during(client, frames, THROTTLE_WINDOW_S, question=QUESTION, options=OPTIONS)
    assert all(r.success for r in responses), [r.message for r in responses if not r.success]
    stamps = {(r.answer.header.stamp.sec, r.answer.header.stamp.nanosec) for r in responses}
    assert len(sent_backwards) >= 30 and not stamps & sent_backwards, "never answered on a frame older than the last"
    assert_throttled(proc, start, since, "(stamps going backwards)")

    # depth and colour of different shapes: answered without 3D, one warning per throttle period
    start, since = len(proc.output()), time.monotonic()
    frames.set("image", Image, colour())
    frames.set("depth", Image, depth(width=320, height=320))
    frames.set("camera_info", CameraInfo, info(width=320, height=320))
    # the kept depth frames of the right shape are replaced (the node keeps the last 8)
    assert spin_until(client.node, lambda: frames.published["depth"] >= 10, CALL)
    responses = ask_during(client, frames, THROTTLE_WINDOW_S, frames_between=1, min_responses=30,
                           question=QUESTION, options=OPTIONS)
    assert all(r.success for r in responses)
    assert not any(o.has_position for r in responses for o in r.answer.scene_graph.objects)
    assert_throttled(proc, start, since, "does not have the aspect of the colour image 320x240: no 3D positions")

    # malformed colour frames of every kind: dropped; the node answers on the last good frame until it is
    # stale (ERROR_STALE_IMAGE, never a wrong answer or a crash), then on the next good frame again
    start, since = len(proc.output()), time.monotonic()
    good = colour()
    bad_kinds = itertools.cycle([
        lambda h: Image(header=h, width=320, height=240, encoding="rgb8", step=960, data=bytes(960 * 240 - 1)),
        lambda h: Image(header=h, width=320, height=240, encoding="rgb8", step=100, data=bytes(100 * 240)),
        lambda h: Image(header=h, width=0, height=240, encoding="rgb8", step=0, data=b""),
        lambda h: Image(header=h, width=320, height=240, encoding="yuv422", step=640, data=bytes(640 * 240)),
        lambda h: Image(header=h, width=2**31, height=2**31, encoding="rgb8", step=2**31, data=bytes(16)),
    ])
    frames.set("depth", Image, depth())
    frames.set("camera_info", CameraInfo, info())
    frames.set("image", Image, lambda header: next(bad_kinds)(header))
    responses = ask_during(client, frames, THROTTLE_WINDOW_S, question=QUESTION, options=OPTIONS)
    codes = [r.error_code for r in responses]
    assert set(codes) <= {E.ERROR_NONE, E.ERROR_STALE_IMAGE} and codes[-1] == E.ERROR_STALE_IMAGE, codes
    assert_throttled(proc, start, since, "frame dropped:")
    frames.set("image", Image, good)
    assert spin_until(client.node, lambda: client.ask(question=QUESTION, options=OPTIONS).success, 10.0)
    assert proc.alive() and "unexpected" not in proc.output()


def test_corrupt_compressed_frames_never_replace_the_last_good_one(spawn, client, frames, replay_file):
    proc = spawn(node_command(**replay_params(replay_file, image_transport="compressed", use_depth=False,
                                           max_image_age=2.0)), name="node")
    ok, jpeg = cv2.imencode(".jpg", pattern_image(320, 240)[:, :, ::-1])
    jpeg = jpeg.tobytes()
    frames.set("image/compressed", CompressedImage,
               lambda header: CompressedImage(header=header, format="jpeg", data=jpeg))
    assert client.ask_until_ready(proc, question=QUESTION, options=OPTIONS).success
    start, since = len(proc.output()), time.monotonic()
    rng = np.random.default_rng(3)
    corrupt = itertools.cycle([
        rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),   # noise
        jpeg[: len(jpeg) // 2],                                 # truncated
        b"",                                                    # empty
        b"\x89PNG\r\n\x1a\n" + bytes(100),                      # a PNG header and nothing after
    ])
    # one good frame in ten: between them, only corrupt frames arrive; every request is still answered on a good one
    counter = itertools.count()
    frames.set("image/compressed", CompressedImage, lambda header: CompressedImage(
        header=header, format="jpeg", data=jpeg if next(counter) % 10 == 0 else next(corrupt)))
    responses = ask_during(client, frames, THROTTLE_WINDOW_S, frames_between=2, topic="image/compressed",
                           min_responses=20, question=QUESTION, options=OPTIONS)
    assert all(r.success for r in responses), [r.message for r in responses if not r.success]
    assert all(r.answer.scene_graph.image_width == 320 for r in responses)
    assert_throttled(proc, start, since, "frame dropped: compressed image")
    # only corrupt frames: the last good one ages out (ERROR_STALE_IMAGE), and the next good one is answered
    frames.set("image/compressed", CompressedImage,
               lambda header: CompressedImage(header=header, format="jpeg", data=next(corrupt)))
    assert spin_until(client.node, lambda: client.ask(question=QUESTION).error_code == E.ERROR_STALE_IMAGE, 10.0)
    frames.set("image/compressed", CompressedImage,
               lambda header: CompressedImage(header=header, format="jpeg", data=jpeg))
    assert spin_until(client.node, lambda: client.ask(question=QUESTION, options=OPTIONS).success, 10.0)
    assert proc.alive()
