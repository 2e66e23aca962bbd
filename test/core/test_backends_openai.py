"""OpenAIBackend against a real `transformers serve` of the tiny checkpoint, and a scripted local HTTP server for
the behaviours a healthy server does not show (stop strings, errors, slowness, keys)."""

import base64
import dataclasses
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pytest
from spatialthinker_ros.testing.http_server import ScriptedHandler, local_http_server
from spatialthinker_ros.testing.processes import free_port

from spatialthinker_ros.core.backends.base import GenerationConfig
from spatialthinker_ros.core.backends.openai_backend import (OpenAIBackend, OpenAIConfig, encode_image,
                                                             letter_probabilities)
from spatialthinker_ros.core.pipeline import PipelineConfig, finish_result, prepare_request
from spatialthinker_ros.core.types import BackendError, BackendErrorKind, InferenceRequest, InferenceResult

pytestmark = pytest.mark.timeout(120)

SECRET = "sk-test-SECRET-0123456789"
SCENE_OPEN = '<observe> a cup on a table </observe> <scene> {"objects": [{"id": "cup.1", "bbox": [1, 2, 3, 4]}]} '


def _request(width: int = 640, height: int = 480, question: str = "q", **kwargs) -> InferenceRequest:
    image = np.random.default_rng(7).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return InferenceRequest(image=image, prompt=f"Image size: {width} x {height}\n\nWhere is the cup?", question=question,
                            **kwargs)


# --- a real OpenAI-compatible server: `transformers serve` with the tiny checkpoint ---------------------------


@pytest.fixture(scope="module")
def in_process_answer(tiny_checkpoint: Path) -> InferenceResult:
    """What the same checkpoint answers in this process, to compare the server's answer with."""
    from spatialthinker_ros.core.backends.transformers import TransformersBackend, TransformersConfig

    backend = TransformersBackend(
        TransformersConfig(
            model=str(tiny_checkpoint), device="cpu", max_pixels=None, generation=GenerationConfig(max_new_tokens=12)
        )
    )
    try:
        [result] = backend.generate([_request()])
    finally:
        backend.close()
    assert isinstance(result, InferenceResult) and result.text   # so comparing texts is not vacuous
    return result


def _served_backend(url: str, checkpoint: Path, **settings) -> OpenAIBackend:
    # transformers serve only accepts the model name it was started with
    return OpenAIBackend(
        OpenAIConfig(server_url=url, model=str(checkpoint), generation=GenerationConfig(max_new_tokens=12), **settings)
    )


def test_real_server_answers_like_the_model_in_process(tiny_server, tiny_checkpoint, in_process_answer):
    backend = _served_backend(tiny_server, tiny_checkpoint, image_format="png")   # lossless: the very same pixels
    try:
        [result] = backend.generate([_request()])
    finally:
        backend.close()
    assert isinstance(result, InferenceResult), result
    # the same tokens; `transformers serve` leaves out the first one's leading space (Qwen's " spel" and the like)
    assert result.text == in_process_answer.text.removeprefix(" ")
    assert result.prompt_tokens == in_process_answer.prompt_tokens
    assert result.completion_tokens == in_process_answer.completion_tokens
    assert result.model == str(tiny_checkpoint)
    assert result.seconds > 0


def test_real_server_streams_growing_text_ending_with_the_result(tiny_server, tiny_checkpoint, in_process_answer):
    seen: list[tuple[str, int]] = []
    backend = _served_backend(tiny_server, tiny_checkpoint)   # JPEG: same size, so the same prompt length
    try:
        [result] = backend.generate([_request(on_text=lambda text, tokens: seen.append((text, tokens)))])
    finally:
        backend.close()
    assert isinstance(result, InferenceResult), result
    assert result.prompt_tokens == in_process_answer.prompt_tokens
    assert 1 <= result.completion_tokens <= 12
    assert len(seen) >= 2
    assert seen[-1] == (result.text, result.completion_tokens)
    for (text, _), (later, _) in zip(seen, seen[1:]):
        assert later.startswith(text)


# --- a scripted local server ----------------------------------------------------------------------------------


@dataclasses.dataclass
class _ScriptState:
    seen: list[dict] = dataclasses.field(default_factory=list)   # path, authorization and body of every request
    together: threading.Barrier = dataclasses.field(default_factory=lambda: threading.Barrier(3))


class _Script(ScriptedHandler):
    """The first path segment picks the behaviour: /{mode}/v1/chat/completions."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.state.seen.append({"path": self.path, "authorization": self.headers.get("Authorization"), "body": body})
        mode = self.path.split("/")[1]
        try:
            getattr(self, f"_{mode}")(body)
        except (BrokenPipeError, ConnectionResetError):   # the client gave up first, as some tests intend
            pass

    def _scene(self, body: dict) -> None:
        """A server that honours stop=["</scene>"] and, as the OpenAI API does, leaves the stop string out."""
        usage = {"prompt_tokens": 100, "completion_tokens": 21, "total_tokens": 121}
        if not body.get("stream"):
            choice = {"index": 0, "message": {"role": "assistant", "content": SCENE_OPEN}, "finish_reason": "stop"}
            self._send(200, json.dumps({"choices": [choice], "usage": usage}).encode())
            return
        pieces = [SCENE_OPEN[:10], SCENE_OPEN[10:40], SCENE_OPEN[40:]]
        events = [{"choices": [{"index": 0, "delta": {"role": "assistant"}}]}]
        events += [{"choices": [{"index": 0, "delta": {"content": piece}}]} for piece in pieces]
        events += [{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, {"choices": [], "usage": usage}]
        self._events(events + ["[DONE]"])

    def _together(self, body: dict) -> None:
        """Answers once three requests are in at the same time, which proves they were sent concurrently."""
        try:
            self.server.state.together.wait(timeout=10)
        except threading.BrokenBarrierError:
            self._send(503, b"three requests never arrived together", "text/plain")
            return
        self._scene(body)

    def _slow(self, body: dict) -> None:
        time.sleep(10)
        self._scene(body)

    def _trickle(self, body: dict) -> None:
        self._events([{"choices": [{"index": 0, "delta": {"content": "x"}}]}] * 100, pause_s=0.1)

    def _fail(self, body: dict) -> None:
        self._send(500, f"internal error for {self.headers.get('Authorization')}: {'x' * 1000}".encode(), "text/plain")

    def _garbage(self, body: dict) -> None:
        self._send(200, b"this is not json")

    def _logprobs(self, body: dict, scripted: Optional[list] = None) -> None:
        """A vLLM-like server: the answer with its per-token logprobs (LOGPROBS_TOKENS, or `scripted`), streamed or
        not."""
        scripted = scripted or LOGPROBS_TOKENS
        tokens = [{"token": token, "logprob": logprob, "bytes": list(token.encode()),
                   "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]}
                  for token, logprob, top in scripted]
        text = "".join(token for token, _, _ in scripted)
        usage = {"prompt_tokens": 100, "completion_tokens": len(tokens), "total_tokens": 100 + len(tokens)}
        if not body.get("stream"):
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                      "logprobs": {"content": tokens} if body.get("logprobs") else None}
            self._send(200, json.dumps({"choices": [choice], "usage": usage}).encode())
            return
        events = [{"choices": [{"index": 0, "delta": {"content": token["token"]},
                                "logprobs": {"content": [token]} if body.get("logprobs") else None}]}
                  for token in tokens]
        self._events(events + [{"choices": [], "usage": usage}, "[DONE]"])

    def _tight(self, body: dict) -> None:
        self._logprobs(body, TIGHT_TOKENS)

    def _fewer(self, body: dict) -> None:
        self._logprobs(body, FEWER_TOKENS)

    def _unoffered(self, body: dict) -> None:
        self._logprobs(body, UNOFFERED_TOKENS)

    def _think(self, body: dict) -> None:
        self._logprobs(body, THINK_TOKENS)

    def _capped(self, body: dict) -> None:
        """vLLM started with --max-logprobs 5: more is refused with its own message."""
        if body.get("top_logprobs", 0) > 5:
            message = f"Requested sample logprobs of {body['top_logprobs']}, which is greater than max allowed: 5"
            self._send(400, json.dumps({"object": "error", "message": message, "code": 400}).encode())
            return
        self._logprobs(body, CAPPED_TOKENS)

    def _unprocessable(self, body: dict) -> None:
        """A server whose 422 does not say what it refused; it answers without logprobs."""
        if "logprobs" in body:
            self._send(422, b'{"detail": "Unprocessable Entity"}')
            return
        self._logprobs(body)

    def _refuse(self, body: dict) -> None:
        """A server that refuses logprobs with an error, and answers without them."""
        if "logprobs" in body:
            self._send(400, b'{"error": "logprobs is not supported"}')
            return
        self._logprobs(body)

    def _streamerror(self, body: dict) -> None:
        self._events([{"error": "'Qwen2_5_VLProcessor' object has no attribute 'get_vocab'"}])


def _top(*pairs, fill: int) -> list:
    """Top alternatives: the given (token, probability) pairs, then `fill` others down to probability 0.001."""
    fillers = [(f"w{i}", 0.01 - i * (0.009 / max(fill - 1, 1))) for i in range(fill)]
    return [(token, math.log(p)) for token, p in list(pairs) + fillers]


# "<answer> (B) right </answer>": at the letter, B and " B" (0.55 + 0.05), A 0.2; C and D are not in the top 20,
# whose 20th holds 0.001
LOGPROBS_TOKENS = [
    ("<", 0.0, []), ("answer", 0.0, []), (">", 0.0, []), (" (", math.log(0.9), _top((" (", 0.9), fill=19)),
    ("B", math.log(0.55), _top(("B", 0.55), ("A", 0.2), (" B", 0.05), fill=17)),
    (")", 0.0, []), (" right", 0.0, []), (" </", 0.0, []), ("answer", 0.0, []), (">", 0.0, []),
]
EXPECTED_PROBABILITIES = [p / 0.802 for p in (0.2, 0.6, 0.001, 0.001)]


def _at_letter(top: list, chosen: str = "B") -> list:
    """LOGPROBS_TOKENS with other alternatives (and chosen token) at the letter."""
    return [(chosen, dict(top).get(chosen, math.log(0.5)), top) if token == "B" else (token, lp, alts)
            for token, lp, alts in LOGPROBS_TOKENS]


# the listed 20 hold 0.9993 (B 0.6, A 0.3, " B" 0.05, 17 others of 0.0029 each): C and D can have at most the 0.0007
# left, less than the lowest listed
TIGHT_TOKENS = _at_letter([(t, math.log(p)) for t, p in [("B", 0.6), ("A", 0.3), (" B", 0.05)]]
                          + [(f"w{i}", math.log(0.0029)) for i in range(17)])
TIGHT_PROBABILITIES = [p / 0.9514 for p in (0.3, 0.65, 0.0007, 0.0007)]
# 3 alternatives where 20 were asked, C and D not among them: nothing bounds them
FEWER_TOKENS = _at_letter(_top(("B", 0.55), ("A", 0.2), (" B", 0.05), fill=0))
# the model wrote E, which is not offered, and no offered letter is listed
UNOFFERED_TOKENS = _at_letter(_top(("E", 0.9), fill=19), chosen="E")
# 5 alternatives (the server's maximum): C and D get the 5th's 0.001
CAPPED_TOKENS = _at_letter(_top(("B", 0.55), ("A", 0.2), (" B", 0.05), fill=2))
# the <think> section quotes the card's example before the real answer
THINK_TOKENS = [("<think>", 0.0, []), (" The", 0.0, []), (" card", 0.0, []), (" writes", 0.0, []), (" <", 0.0, []),
                ("answer", 0.0, []), (">", 0.0, []), (" (", 0.0, []), ("A", math.log(0.99), _top(("A", 0.99), fill=19)),
                (")", 0.0, []), (" cat", 0.0, []), (" </", 0.0, []), ("answer", 0.0, []), (">", 0.0, []),
                (" </", 0.0, []), ("think", 0.0, []), (">", 0.0, []), (" ", 0.0, [])] + LOGPROBS_TOKENS
OPTIONS_QUESTION = "Where is the cup? (A) left (B) right (C) behind (D) in front"


@pytest.fixture(scope="module")
def script_server():
    with local_http_server(_Script, _ScriptState()) as server:
        yield server


@pytest.fixture
def script(script_server):
    """backend(mode, **settings) -> an OpenAIBackend talking to the scripted server in that mode."""
    script_server.state.seen.clear()
    backends = []

    def backend(mode: str, **settings) -> OpenAIBackend:
        url = f"http://127.0.0.1:{script_server.server_address[1]}/{mode}/v1"
        backends.append(OpenAIBackend(OpenAIConfig(server_url=url, model="spatialthinker", **settings)))
        return backends[-1]

    backend.seen = script_server.state.seen
    yield backend
    for created in backends:
        created.close()


def test_request_carries_the_image_prompt_and_greedy_settings(script):
    image = np.zeros((480, 640, 3), np.uint8)
    image[:, :320] = (255, 0, 0)   # red on the left, in RGB
    request = InferenceRequest(image=image, prompt="Image size: 640 x 480\n\nWhat is red?", question="What is red?")
    [result] = script("scene", generation=GenerationConfig(max_new_tokens=300)).generate([request])

    assert result.text == SCENE_OPEN   # a full request gets no tag appended
    assert (result.prompt_tokens, result.completion_tokens, result.model) == (100, 21, "spatialthinker")
    [sent] = script.seen
    assert sent["path"] == "/scene/v1/chat/completions"
    assert sent["authorization"] is None
    body = sent["body"]
    assert (body["model"], body["max_tokens"], body["temperature"]) == ("spatialthinker", 300, 0.0)
    assert "stop" not in body and "stream" not in body
    [message] = body["messages"]
    image_part, text_part = message["content"]
    assert message["role"] == "user" and text_part == {"type": "text", "text": request.prompt}
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    decoded = cv2.imdecode(np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (480, 640, 3)
    assert np.abs(decoded[240, 100].astype(int) - (0, 0, 255)).max() <= 8   # BGR: red stayed red
    assert np.abs(decoded[240, 500].astype(int)).max() <= 8


def test_scene_only_asks_the_server_to_stop_and_restores_the_tag(script):
    [result] = script("scene").generate([_request(scene_only=True)])
    assert result.text == SCENE_OPEN + "</scene>"
    assert script.seen[0]["body"]["stop"] == ["</scene>"]


def test_scene_only_streaming_restores_the_tag_in_the_last_text(script):
    seen: list[tuple[str, int]] = []
    [result] = script("scene").generate([_request(scene_only=True, on_text=lambda t, n: seen.append((t, n)))])
    body = script.seen[0]["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert result.text == SCENE_OPEN + "</scene>"
    assert (result.prompt_tokens, result.completion_tokens) == (100, 21)
    assert [text for text, _ in seen] == [SCENE_OPEN[:10], SCENE_OPEN[:40], SCENE_OPEN, result.text]
    assert [tokens for _, tokens in seen] == [1, 2, 3, 21]


def test_a_failing_stream_consumer_does_not_cost_the_answer(script):
    calls = []

    def broken(text: str, tokens: int) -> None:
        calls.append(text)
        raise RuntimeError("consumer bug")

    [result] = script("scene").generate([_request(scene_only=True, on_text=broken)])
    assert result.text == SCENE_OPEN + "</scene>"
    assert calls == [SCENE_OPEN[:10]]


def test_requests_of_one_call_are_sent_concurrently(script):
    backend = script("together", max_concurrency=3)
    results = backend.generate([_request(), _request(), _request()])
    assert [getattr(r, "text", r) for r in results] == [SCENE_OPEN] * 3
    with pytest.raises(ValueError, match="exceed max_batch_size 3"):
        backend.generate([_request()] * 4)


def test_questions_about_one_frame_share_the_leading_bytes_a_prefix_cache_reuses(script):
    """vLLM and SGLang cache the longest shared prefix (the image included): the frame must come first, sent as
    the same bytes each time, with nothing that varies per request ahead of it."""
    first, follow_up = _request(), _request()   # equal pixels, two arrays
    follow_up.prompt = "Image size: 640 x 480\n\nIs the cup left of the plate?"
    backend = script("scene")
    backend.generate([first])
    backend.generate([follow_up])
    bodies = [json.dumps(seen["body"]["messages"]) for seen in script.seen]
    shared = len(os.path.commonprefix(bodies))
    image_url = script.seen[0]["body"]["messages"][0]["content"][0]["image_url"]["url"]
    assert bodies[0].index(image_url) + len(image_url) < shared   # the whole image lies in the shared prefix
    assert bodies[0][shared:].startswith("Where is the cup?")       # they differ only where the questions do


def test_a_slow_server_times_out_within_the_bound(script):
    started = time.perf_counter()
    [result] = script("slow", timeout_s=0.5).generate([_request()])
    assert time.perf_counter() - started < 5.0   # the server answers after 10 s
    assert isinstance(result, BackendError) and result.kind is BackendErrorKind.TIMEOUT
    assert "did not answer within 0.5 s" in str(result)


def test_a_stream_that_never_ends_times_out_within_the_bound(script):
    started = time.perf_counter()
    [result] = script("trickle", timeout_s=0.5).generate([_request(on_text=lambda t, n: None)])
    assert time.perf_counter() - started < 5.0   # the stream goes on for 10 s
    assert isinstance(result, BackendError) and result.kind is BackendErrorKind.TIMEOUT


def test_nothing_listening_is_unavailable_quickly():
    url = f"http://127.0.0.1:{free_port()}/v1"
    backend = OpenAIBackend(OpenAIConfig(server_url=url))
    try:
        started = time.perf_counter()
        [result] = backend.generate([_request()])
    finally:
        backend.close()
    assert time.perf_counter() - started < 2.0
    assert isinstance(result, BackendError) and result.kind is BackendErrorKind.UNAVAILABLE
    assert f"inference server at {url} is not reachable" in str(result)


def test_http_500_fails_with_status_and_a_short_body_without_the_key(script, monkeypatch):
    monkeypatch.setenv("TEST_SPATIALTHINKER_KEY", SECRET)
    backend = script("fail", api_key_env="TEST_SPATIALTHINKER_KEY")
    [result] = backend.generate([_request()])
    assert script.seen[0]["authorization"] == f"Bearer {SECRET}"   # the server echoed it into its error body
    assert isinstance(result, BackendError) and result.kind is BackendErrorKind.FAILED
    message = str(result)
    assert message.startswith("inference server answered HTTP 500: internal error for Bearer ***: xxx")
    assert SECRET not in message and len(message) < 400
    for text in (repr(backend), repr(backend.config), str(vars(backend.config))):
        assert SECRET not in text


def test_the_key_goes_only_into_the_authorization_header(script, monkeypatch):
    monkeypatch.setenv("TEST_SPATIALTHINKER_KEY", SECRET)
    [result] = script("scene", api_key_env="TEST_SPATIALTHINKER_KEY").generate([_request()])
    assert result.text == SCENE_OPEN
    assert script.seen[0]["authorization"] == f"Bearer {SECRET}"
    assert SECRET not in json.dumps(script.seen[0]["body"])


def test_malformed_json_fails(script):
    [result] = script("garbage").generate([_request()])
    assert isinstance(result, BackendError) and result.kind is BackendErrorKind.FAILED
    assert "malformed answer" in str(result)


def test_an_error_event_in_the_stream_fails_with_its_text(script):
    [result] = script("streamerror").generate([_request(on_text=lambda t, n: None)])
    assert isinstance(result, BackendError) and result.kind is BackendErrorKind.FAILED
    assert "get_vocab" in str(result)


def test_closed_backend_answers_unavailable(script):
    backend = script("scene")
    backend.close()
    [result] = backend.generate([_request()])
    assert isinstance(result, BackendError) and result.kind is BackendErrorKind.UNAVAILABLE


def test_png_encoding_is_lossless_and_rgb():
    image = np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    url = encode_image(image, "png")
    assert url.startswith("data:image/png;base64,")
    decoded = cv2.imdecode(np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(decoded[:, :, ::-1], image)


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/v1", "127.0.0.1:8000/v1", "http://", "file:///tmp/socket", "http://host:99999/v1",
     "http://host/v1?x=1"],
)
def test_server_url_must_be_http_with_a_host(url):
    with pytest.raises(ValueError):
        OpenAIConfig(server_url=url)


def test_credentials_in_the_url_are_refused_without_repeating_them():
    with pytest.raises(ValueError) as raised:
        OpenAIConfig(server_url=f"https://robot:{SECRET}@gpu.example.com/v1")
    assert SECRET not in str(raised.value)


@pytest.mark.parametrize(
    "settings",
    [{"timeout_s": 0}, {"connect_timeout_s": -1}, {"max_concurrency": 0}, {"image_format": "webp"},
     {"jpeg_quality": 0}, {"model": ""}],
)
def test_invalid_settings_are_rejected(settings):
    with pytest.raises(ValueError):
        OpenAIConfig(**settings)


# --- max_pixels: frames are sent no larger than the processor limit, and the prompt states the size sent -------


def _frame(width: int, height: int) -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _arrived_size(sent: dict) -> tuple[int, int]:
    url = sent["body"]["messages"][0]["content"][0]["image_url"]["url"]
    decoded = cv2.imdecode(np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
    return decoded.shape[1], decoded.shape[0]


def test_a_1080p_frame_arrives_at_the_processor_size_and_boxes_map_back_to_the_camera(script):
    backend = script("scene")                                  # default max_pixels 1003520
    config = PipelineConfig().for_backend(backend)
    request = prepare_request(_frame(1920, 1080), "Where is the cup?", [], config)
    [result] = backend.generate([request])
    assert _arrived_size(script.seen[0]) == (1316, 728)      # as Qwen's processor resizes it: 1222 image tokens
    assert "Image size: 1316 x 728\n\n" in script.seen[0]["body"]["messages"][0]["content"][1]["text"]
    finished = finish_result(request, result, [], camera_size=(1920, 1080), config=config)
    [cup] = finished.scene.objects                            # bbox [1, 2, 3, 4] in the 1316x728 image sent
    assert (cup.box.x_min, cup.box.y_max) == pytest.approx((1920 / 1316, 4 * 1080 / 728))


def test_frames_within_max_pixels_are_sent_as_they_are(script):
    backend = script("scene", max_pixels=12544)
    request = prepare_request(_frame(112, 112), "Where is the cup?", [], PipelineConfig().for_backend(backend))
    backend.generate([request])
    assert _arrived_size(script.seen[0]) == (112, 112)


def test_a_frame_over_max_pixels_is_never_sent(script):
    backend = script("scene", max_pixels=12544)
    request = prepare_request(_frame(640, 480), "Where is the cup?", [])   # not prepared for this backend
    [result] = backend.generate([request])
    assert isinstance(result, BackendError) and "exceeds max_pixels 12544" in str(result)
    assert script.seen == []


def test_real_server_sees_the_image_tokens_the_in_process_backend_uses(tiny_server, tiny_checkpoint):
    """transformers serve keeps the checkpoint's own processor limit (50176 pixels for the tiny one); the backend's
    max_pixels (here 12544) still bounds what it sees, exactly as the in-process processor bounds it."""
    from spatialthinker_ros.core.backends.transformers import TransformersBackend, TransformersConfig

    frame = _frame(1920, 1080)
    limited = _served_backend(tiny_server, tiny_checkpoint, image_format="png", max_pixels=12544)
    unlimited = _served_backend(tiny_server, tiny_checkpoint, image_format="png", max_pixels=16777216)
    in_process = TransformersBackend(TransformersConfig(model=str(tiny_checkpoint), device="cpu", max_pixels=12544,
                                                        generation=GenerationConfig(max_new_tokens=12)))
    try:
        request = prepare_request(frame, "Where is the cup?", [], PipelineConfig().for_backend(limited))
        assert request.image.shape == (84, 140, 3) and "Image size: 140 x 84" in request.prompt
        [served] = limited.generate([request])
        # in-process: the full frame with the same prompt, resized by the processor itself
        [local] = in_process.generate([InferenceRequest(image=frame, prompt=request.prompt, question="q")])
        full = prepare_request(frame, "Where is the cup?", [], PipelineConfig().for_backend(unlimited))
        [whole] = unlimited.generate([full])
    finally:
        for backend in (limited, unlimited, in_process):
            backend.close()
    assert isinstance(served, InferenceResult) and isinstance(whole, InferenceResult), (served, whole)
    assert served.prompt_tokens == local.prompt_tokens
    assert whole.prompt_tokens > served.prompt_tokens + 30   # the server's own limit alone: 64 image tokens, not 16


# --- option probabilities ------------------------------------------------------------------------------------------
def _options_request(**kwargs) -> InferenceRequest:
    return _request(question=OPTIONS_QUESTION, **kwargs)


@pytest.mark.parametrize("stream", [False, True])
def test_option_probabilities_are_read_at_the_letter_with_a_bound_for_letters_outside_the_top_20(script, stream):
    backend = script("logprobs")
    on_text = (lambda text, tokens: None) if stream else None
    [result] = backend.generate([_options_request(on_text=on_text)])

    assert result.text == "<answer> (B) right </answer>"
    assert result.option_probabilities == pytest.approx(EXPECTED_PROBABILITIES, abs=1e-9)
    assert result.option_probabilities_note == ""
    [sent] = script.seen
    assert (sent["body"]["logprobs"], sent["body"]["top_logprobs"]) == (True, 20)


def test_free_form_questions_ask_for_no_logprobs(script):
    [result] = script("logprobs").generate([_request()])
    assert (result.option_probabilities, result.option_probabilities_note) == ((), "")
    assert "logprobs" not in script.seen[0]["body"] and "top_logprobs" not in script.seen[0]["body"]


def test_a_server_refusing_logprobs_still_answers_and_is_asked_without_them_from_then_on(script, caplog):
    backend = script("refuse")
    with caplog.at_level(logging.WARNING, logger="spatialthinker_ros.core.backends.openai_backend"):
        first, second = backend.generate([_options_request(), _options_request()])
        [third] = backend.generate([_options_request()])

    for result in (first, second, third):
        assert isinstance(result, InferenceResult) and result.text == "<answer> (B) right </answer>"
        assert result.option_probabilities == ()
        assert result.option_probabilities_note.startswith("the inference server refused logprobs (HTTP 400")
    assert "logprobs" not in script.seen[-1]["body"]
    assert len(script.seen) <= 5   # at most the two concurrent first requests were refused
    [line] = [r for r in caplog.records if "no option probabilities" in r.getMessage()]
    assert "refused logprobs" in line.getMessage()


def test_real_server_answers_without_option_probabilities_and_says_why_once(tiny_server, tiny_checkpoint, caplog):
    backend = _served_backend(tiny_server, tiny_checkpoint)
    try:
        with caplog.at_level(logging.WARNING, logger="spatialthinker_ros.core.backends.openai_backend"):
            first, second = backend.generate([_options_request(), _options_request()])
            [third] = backend.generate([_options_request()])
    finally:
        backend.close()
    for result in (first, second, third):
        assert isinstance(result, InferenceResult) and result.text, result
        assert result.option_probabilities == ()
        assert "returned no logprobs" in result.option_probabilities_note
    assert len([r for r in caplog.records if "no option probabilities" in r.getMessage()]) == 1


@pytest.mark.parametrize("mode, expected, note", [
    ("tight", TIGHT_PROBABILITIES, ""),
    ("fewer", (), "the server listed 3 alternatives at the option letter, fewer than the 20 asked, without every "
                  "offered letter (A..D): the others cannot be bounded"),
    ("unoffered", (), "no offered letter (A..D) is among the server's alternatives at the option letter"),
])
def test_letters_outside_the_alternatives_get_only_what_the_list_allows(script, mode, expected, note):
    [result] = script(mode).generate([_options_request()])
    assert result.option_probabilities == pytest.approx(expected, abs=1e-9)
    assert result.option_probabilities_note == note


def _entry(token: str, probability: float, alternatives: dict[str, float]) -> dict:
    return {"token": token, "logprob": math.log(probability),
            "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in alternatives.items()]}


def test_a_letter_after_a_lone_tag_close_sums_both_ways_of_writing_each_letter():
    """"<answer>" ">" "C": a letter's probability is P(">L") at the ">" plus P(">") P("L" | ">") at the letter;
    D, listed at neither, gets each list's bound (0.05 at both: the lowest listed, and what each list leaves)."""
    plain = {"token": "x", "logprob": 0.0, "top_logprobs": []}
    tokens = [{**plain, "token": "<"}, {**plain, "token": "answer"},
              _entry(">", 0.3, {">B": 0.5, ">": 0.3, ">A": 0.1, ">C": 0.05}),
              _entry("C", 0.6, {"C": 0.6, "Q": 0.2, "B": 0.1, "A": 0.05}),
              {**plain, "token": "</"}, {**plain, "token": "answer"}, {**plain, "token": ">"}]
    masses = [0.1 + 0.3 * 0.05, 0.5 + 0.3 * 0.1, 0.05 + 0.3 * 0.6, 0.05 + 0.3 * 0.05]
    probabilities, note = letter_probabilities(tokens, 4, asked=4)
    assert note == ""
    assert probabilities == pytest.approx([m / sum(masses) for m in masses], abs=1e-12)
    # the same letter written with ">" in one token is read at that token alone
    merged = [tokens[0], tokens[1], _entry(">C", 0.05, {">B": 0.5, ">": 0.3, ">A": 0.1, ">C": 0.05})] + tokens[4:]
    probabilities, note = letter_probabilities(merged, 4, asked=4)
    assert probabilities == pytest.approx([m / 0.7 for m in (0.1, 0.5, 0.05, 0.05)], abs=1e-12)


def test_a_stated_maximum_of_alternatives_is_honoured_from_then_on(script, caplog):
    backend = script("capped")
    with caplog.at_level(logging.WARNING, logger="spatialthinker_ros.core.backends.openai_backend"):
        [first] = backend.generate([_options_request()])
        [second] = backend.generate([_options_request()])
    for result in (first, second):
        assert result.option_probabilities == pytest.approx(EXPECTED_PROBABILITIES, abs=1e-9)
        assert result.option_probabilities_note == ""
    assert [seen["body"]["top_logprobs"] for seen in script.seen] == [20, 5, 5]   # one refusal, then 5 each time
    assert len([r for r in caplog.records if "allows 5 top_logprobs" in r.getMessage()]) == 1


def test_a_422_to_logprobs_is_retried_once_without_them(script):
    backend = script("unprocessable")
    [first] = backend.generate([_options_request()])
    [second] = backend.generate([_options_request()])
    assert first.text == second.text == "<answer> (B) right </answer>"
    assert first.option_probabilities == () and "refused logprobs (HTTP 422" in first.option_probabilities_note
    assert ["logprobs" in seen["body"] for seen in script.seen] == [True, False, False]


def test_a_think_section_quoting_the_cards_example_does_not_move_the_probe(script):
    [result] = script("think").generate([_options_request()])
    assert result.text.startswith("<think> The card writes <answer> (A) cat </answer> </think> <answer> (B)")
    assert result.option_probabilities == pytest.approx(EXPECTED_PROBABILITIES, abs=1e-9)
