"""core/request.py: the rules on what a caller may ask, shared by the node and spatialthinker-ask."""

import numpy as np
import pytest
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as transformers_smart_resize

from spatialthinker_ros.core.backends.settings import applies_to, backend_settings
from spatialthinker_ros.core.backends.base import GenerationConfig
from spatialthinker_ros.core.pipeline import PipelineConfig, answer_dict, finish_result, prepare_request, smaller_request
from spatialthinker_ros.core.prompt import PromptConfig
from spatialthinker_ros.core.request import (ErrorCode, ImageError, InvalidRequest, RequestError, answered,
                                             check_raw_layout, check_image_age, check_question, check_request_id,
                                             depth_aspect_mismatch, max_image_age, model_image_size, oom_retry_pixels,
                                             smart_resize)
from spatialthinker_ros.core.scheduling import QueueFull, RequestCancelled, RequestTimeout, SchedulerStopped
from spatialthinker_ros.core.text import excerpt
from spatialthinker_ros.core.types import BackendError, BackendErrorKind, InferenceResult

RESPONSE = ('<observe>a mug</observe><scene>{"objects": [{"id": "mug.1", "bbox": [10, 20, 30, 40]}], '
            '"relationships": []}</scene><think>left</think><answer>(A) left of</answer>')


def test_lengths_count_the_whitespace_the_caller_sent():
    config = PromptConfig(max_question_chars=10, max_option_chars=5)
    with pytest.raises(InvalidRequest, match="12 characters long \\(with its whitespace\\); at most 10"):
        check_question("   Where?   ", [], config)
    with pytest.raises(InvalidRequest, match="is 11 characters long; at most 10"):
        check_question("Where is it", [], config)
    with pytest.raises(InvalidRequest, match="option B is 7 characters long \\(with its whitespace\\)"):
        check_question("Where?", ["left", " right "], config)
    asked = check_question("  Where?\n", ["(A) left", " right\nof"], PromptConfig())
    assert (asked.text, asked.options) == ("Where?", ("left", "right of"))


def test_every_refusal_is_a_request_error_with_its_code():
    assert issubclass(InvalidRequest, RequestError) and InvalidRequest("x").code is ErrorCode.INVALID_REQUEST
    codes = {QueueFull: ErrorCode.BUSY, SchedulerStopped: ErrorCode.NOT_ACTIVE, RequestTimeout: ErrorCode.TIMEOUT,
             RequestCancelled: ErrorCode.CANCELLED}
    for error, code in codes.items():
        assert isinstance(error("x"), RequestError) and error("x").code is code
    with pytest.raises(RequestError) as raised:
        answered(BackendError(BackendErrorKind.UNAVAILABLE, "server down"), "openai")
    assert raised.value.code is ErrorCode.BACKEND and str(raised.value) == "backend openai (unavailable): server down"
    assert answered(InferenceResult(text="t"), "openai").text == "t"


def test_image_layout_and_pixel_cap():
    layouts = {"rgb8": (3, np.uint8), "16uc1": (1, np.uint16)}
    assert check_raw_layout(4, 2, 14, 28, "RGB8", layouts, 100) == (3, np.dtype(np.uint8))
    for args, message in [((4, 2, 12, 24, "yuv", layouts, 100), "unsupported encoding 'yuv'"),
                          ((0, 2, 12, 24, "rgb8", layouts, 100), "zero size"),
                          ((40, 20, 120, 2400, "rgb8", layouts, 100), "exceeds the 100-pixel limit"),
                          ((4, 2, 10, 20, "16UC1", layouts, 100), None),
                          ((4, 2, 6, 12, "16UC1", layouts, 100), "step 6 is smaller"),
                          ((4, 2, 8, 17, "16UC1", layouts, 100), "data holds 17 bytes")]:
        if message is None:
            check_raw_layout(*args)
        else:
            with pytest.raises(ImageError, match=message):
                check_raw_layout(*args)


def test_the_processor_limit_follows_qwens_smart_resize():
    for height, width in [(1080, 1920), (720, 1280), (480, 640), (1000, 1000), (3000, 4000), (100, 5000)]:
        for max_pixels in (12544, 401408, 1003520):
            assert smart_resize(height, width, max_pixels) == transformers_smart_resize(
                height, width, 28, 56 * 56, max_pixels), (height, width, max_pixels)
    assert model_image_size((1920, 1080), 1920 * 1080, 1003520) == (1316, 728)   # 1222 image tokens, not 2691
    assert model_image_size((1280, 720), 1920 * 1080, 1003520) == (1280, 720)    # the processor keeps its grid
    assert model_image_size((640, 480), 1920 * 1080, 1003520) == (640, 480)
    assert model_image_size((1920, 1080), 1920 * 1080) == (1920, 1080)           # no processor limit: area cap only


def test_depth_must_show_the_colour_image_field_of_view():
    assert depth_aspect_mismatch((640, 480), (320, 240)) is None
    assert depth_aspect_mismatch((640, 480), (1280, 960)) is None
    assert "depth 100x100 does not have the aspect of the colour image 640x480" in depth_aspect_mismatch(
        (640, 480), (100, 100))


def test_image_age():
    assert max_image_age(0.0, 1.0) == 1.0 and max_image_age(2.5, 1.0) == 2.5
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidRequest, match="max_image_age must be >= 0"):
            max_image_age(bad, 1.0)
    check_image_age(5.0, 0.0, "default")              # 0: no limit
    with pytest.raises(RequestError, match="is 2.00 s old \\(limit 1.00 s\\)") as raised:
        check_image_age(2.0, 1.0, "default")
    assert raised.value.code is ErrorCode.STALE_IMAGE


def test_one_retry_on_half_the_image_after_out_of_memory():
    assert oom_retry_pixels((1920, 1080)) == 960 * 540
    assert oom_retry_pixels((320, 240)) is None
    rgb = np.zeros((1080, 1920, 3), np.uint8)
    request = prepare_request(rgb, " Where? ", ["left of"], request_id="r")
    oom = BackendError(BackendErrorKind.OUT_OF_MEMORY, "CUDA out of memory")
    assert smaller_request(request, rgb, PipelineConfig(), InferenceResult(text="")) is None
    assert smaller_request(request, rgb, PipelineConfig(), BackendError(BackendErrorKind.TIMEOUT, "t")) is None
    smaller = smaller_request(request, rgb, PipelineConfig(), oom)
    assert smaller.image.shape == (540, 960, 3) and "Image size: 960 x 540\n\nWhere? (A) left of" in smaller.prompt
    assert (smaller.question, smaller.request_id) == (" Where? ", "r")
    assert smaller_request(smaller, rgb, PipelineConfig(), oom).image.shape == (270, 480, 3)


def test_answer_dict_is_the_json_form_of_an_answer():
    rgb = np.zeros((480, 640, 3), np.uint8)
    request = prepare_request(rgb, "Where is the mug?", ["left of", "right of"])
    result = finish_result(request, InferenceResult(text=RESPONSE, prompt_tokens=5, completion_tokens=7, model="m",
                                                    seconds=0.1234), ["left of", "right of"], camera_size=(1280, 960))
    data = answer_dict(result.parsed, result.inference, "Where is the mug?", ["left of", "right of"])
    assert (data["answer"], data["choice"], data["status"]) == ("(A) left of", "A", "complete")
    assert data["objects"] == [{"id": "mug.1", "label": "mug", "box": [20.0, 40.0, 60.0, 80.0], "position_m": None,
                                "size_m": None, "depth_spread_m": None, "depth_ambiguous": None}]
    assert (data["image_size"], data["seconds"], data["model"]) == ([1280, 960], 0.123, "m")


def test_backend_settings_are_built_from_the_node_parameter_names():
    values = dict(backend="openai", model="m", device="cpu", server_url="http://h:1/v1", server_timeout=3.0,
                  max_batch_size=2, max_pixels=12544, max_new_tokens=16, replay_file="f", replay_latency=0.5)
    assert backend_settings("openai", values) == dict(
        server_url="http://h:1/v1", model="m", timeout_s=3.0, max_concurrency=2, max_pixels=12544,
        generation=GenerationConfig(max_new_tokens=16))
    assert backend_settings("replay", values) == dict(replay_file="f", latency_s=0.5)
    assert backend_settings("transformers", {"model": "m", "device": None}) == {"model": "m"}
    assert applies_to("device") == ("transformers",) and applies_to("max_pixels") == ("transformers", "openai")


def test_excerpt_bounds_any_text_and_says_how_long_it_was():
    assert excerpt("a  b\n c") == "a b c"
    assert excerpt("x" * 100, 10) == "xxxxxxxxxx... (100 characters)"


def test_an_unexpected_exception_becomes_a_bounded_reply():
    """A bug's exception may quote a whole input (a frame's bytes, a model's output): its reply stays bounded."""
    from spatialthinker_ros.core.request import MAX_INTERNAL_ERROR_CHARS, internal_error

    error = internal_error(ValueError("could not convert " + "x" * 1_000_000))
    assert error.code is ErrorCode.BACKEND
    assert str(error).startswith("internal error: ValueError: could not convert xxx")
    assert len(str(error)) < MAX_INTERNAL_ERROR_CHARS + 100


@pytest.mark.parametrize("request_id", ["pick-7", "a", "x" * 64, "mcp-0f3a.plan:2_b"])
def test_a_request_id_of_the_allowed_form_is_taken(request_id):
    assert check_request_id(request_id, {"other"}) == request_id


@pytest.mark.parametrize(("request_id", "problem"), [
    ("x" * 65, "1 to 64 characters"), ("has space", "1 to 64 characters"), ("new\nline", "1 to 64 characters"),
    ("ünï", "1 to 64 characters"), ("busy", "still in progress"),
])
def test_a_request_id_of_another_form_or_in_progress_is_an_invalid_request(request_id, problem):
    with pytest.raises(InvalidRequest, match=problem) as refused:
        check_request_id(request_id, {"busy"})
    assert len(str(refused.value)) < 200, "the message stays short whatever was sent"
