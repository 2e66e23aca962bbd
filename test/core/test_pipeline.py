import json

import numpy as np
import pytest

from spatialthinker_ros.core.geometry import CameraIntrinsics, DepthImage, LiftConfig
from spatialthinker_ros.core.pipeline import PipelineConfig, finish_result, prepare_request
from spatialthinker_ros.core.prompt import PromptConfig
from spatialthinker_ros.core.request import InvalidRequest, model_image_size
from spatialthinker_ros.core.types import AnswerStatus, InferenceResult

OPTIONS = ["left of", "right of"]
K640 = CameraIntrinsics(fx=500.0, fy=500.0, cx=319.5, cy=239.5, width=640, height=480)
HALF_SIZE = PipelineConfig(max_input_pixels=640 * 480)


def response(objects, relationships=(), answer="(B) right of", scene_only=False):
    scene = json.dumps({"objects": objects, "relationships": list(relationships)})
    text = f"<observe>A mug and a laptop on a desk.</observe>\n<scene>{scene}</scene>"
    if scene_only:
        return text
    return f"{text}\n<think>The laptop is right of the mug.</think>\n<answer>{answer}</answer>"


MUG_LAPTOP = [{"id": "mug.1", "bbox": [100, 200, 150, 260]}, {"id": "laptop.1", "bbox": [300, 150, 500, 300]}]
RIGHT_OF = [{"subject": "laptop.1", "predicate": "right of", "object": "mug.1"}]


def camera_image(width=1280, height=960):
    return np.zeros((height, width, 3), dtype=np.uint8)


def depth_640():
    """Registered depth at 640x480: wall at 3 m, mug at 0.8 m, laptop at 1.2 m (model-image coordinates)."""
    depth = np.full((480, 640), 3.0, dtype=np.float32)
    depth[200:260, 100:150] = 0.8
    depth[150:300, 300:500] = 1.2
    return depth


# ---- prepare_request ------------------------------------------------------------------------------------

def test_small_image_is_passed_through_and_prompt_states_its_size():
    image = camera_image(640, 480)
    seen = []
    request = prepare_request(image, "  Where is the laptop relative to the mug? ", OPTIONS,
                              on_text=lambda text, n: seen.append(n), request_id="r1")
    assert request.image is image
    assert "\n\nImage size: 640 x 480\n\nWhere is the laptop relative to the mug? (A) left of (B) right of" \
        in request.prompt
    assert request.question == "  Where is the laptop relative to the mug? "
    assert (request.scene_only, request.request_id) == (False, "r1")
    request.on_text("x", 3)
    assert seen == [3]


def test_large_image_is_downscaled_with_area_averaging():
    image = np.zeros((2160, 3840, 3), dtype=np.uint8)
    image[::2, ::2] = 200          # one bright pixel in every 2x2 block averages to 50
    request = prepare_request(image, "Where?", [], PipelineConfig(), scene_only=True)
    assert request.image.shape == (1080, 1920, 3)
    assert request.image.dtype == np.uint8 and request.image.flags["C_CONTIGUOUS"]
    assert np.all(request.image == 50)
    assert "Image size: 1920 x 1080\n\nWhere?" in request.prompt
    assert request.scene_only


def test_model_image_size_keeps_aspect_within_the_pixel_cap():
    assert model_image_size((640, 480), 1920 * 1080) == (640, 480)
    width, height = model_image_size((4000, 3000), 1920 * 1080)
    assert (width, height) == (1662, 1247)
    assert width * height <= 1920 * 1080
    assert model_image_size((10000, 1), 100) == (100, 1)


@pytest.mark.parametrize("image, message", [
    (np.zeros((480, 640, 3), dtype=np.float32), "RGB uint8"),
    (np.zeros((480, 640), dtype=np.uint8), "RGB uint8"),
    (np.zeros((480, 640, 4), dtype=np.uint8), "RGB uint8"),
    (np.zeros((0, 640, 3), dtype=np.uint8), "empty"),
    ([[0, 0, 0]], "numpy array"),
])
def test_bad_images_are_invalid_requests(image, message):
    with pytest.raises(InvalidRequest, match=message):
        prepare_request(image, "Where?", [])


def test_bad_question_is_an_invalid_request():
    with pytest.raises(InvalidRequest, match="question is empty"):
        prepare_request(camera_image(), "   ", OPTIONS)
    with pytest.raises(InvalidRequest, match="3 options given"):
        prepare_request(camera_image(), "Where?", ["a", "b", "c"], PipelineConfig(prompt=PromptConfig(max_options=2)))


@pytest.mark.parametrize("kwargs", [{"max_input_pixels": 0}, {"max_request_image_pixels": 0}])
def test_pipeline_config_is_validated(kwargs):
    with pytest.raises(ValueError):
        PipelineConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [{"min_valid_fraction": 0.0}, {"min_valid_fraction": 1.5},
                                    {"max_depth_m": float("nan")}, {"max_depth_m": 0.04}, {"min_depth_m": 0.0},
                                    {"min_depth_m": -1.0}, {"min_depth_m": float("inf")}, {"shrink": 0.0},
                                    {"shrink": 1.5}])
def test_lift_config_is_validated(kwargs):
    with pytest.raises(ValueError):
        LiftConfig(**kwargs)


def answered(**fields) -> InferenceResult:
    """The backend's result with option probabilities for OPTIONS (none would be named in the problems)."""
    return InferenceResult(option_probabilities=(0.9, 0.1), **fields)


# ---- finish_result --------------------------------------------------------------------------------------

def test_boxes_come_back_in_camera_pixels_without_depth():
    request = prepare_request(camera_image(), "Where is the laptop relative to the mug?", OPTIONS, HALF_SIZE)
    result = answered(text=response(MUG_LAPTOP, RIGHT_OF), completion_tokens=90, model="m")
    finished = finish_result(request, result, OPTIONS, (1280, 960))
    assert finished.model_image_size == (640, 480)
    assert finished.prompt == request.prompt and finished.inference is result
    assert finished.parsed.status is AnswerStatus.COMPLETE and finished.parsed.problems == ()
    assert finished.parsed.choice == "B"
    assert finished.scene.image_size == (1280, 960)
    mug = finished.scene.objects[0]
    assert (mug.box.x_min, mug.box.y_min, mug.box.x_max, mug.box.y_max) == (200, 400, 300, 520)
    assert all(o.position is None for o in finished.scene.objects)
    assert len(finished.scene.relations) == 1


def test_objects_are_lifted_with_depth_at_another_resolution():
    request = prepare_request(camera_image(), "Where is the laptop relative to the mug?", OPTIONS, HALF_SIZE)
    finished = finish_result(request, answered(text=response(MUG_LAPTOP, RIGHT_OF)), OPTIONS, (1280, 960),
                             depth=DepthImage.from_metres(depth_640()), intrinsics=K640)
    assert finished.parsed.status is AnswerStatus.COMPLETE and finished.parsed.problems == ()
    mug, laptop = (o.position for o in finished.scene.objects)
    # Mug: depth box [100, 200, 150, 260] at 0.8 m; pixel centre (124.5, 229.5).
    assert (mug.x, mug.y, mug.z) == pytest.approx(((124.5 - 319.5) * 0.8 / 500, (229.5 - 239.5) * 0.8 / 500, 0.8))
    assert (mug.size_x, mug.size_y) == pytest.approx((50 * 0.8 / 500, 60 * 0.8 / 500))
    assert laptop.z == pytest.approx(1.2) and laptop.x == pytest.approx((399.5 - 319.5) * 1.2 / 500)


def test_an_ambiguous_position_is_named_in_the_status_message_of_a_complete_answer():
    depth = depth_640()
    depth[150:300, 300:500] = 3.0
    depth[230:300, 300:500] = 1.2     # the laptop fills the lower half of its box: wall above it, two surfaces
    request = prepare_request(camera_image(), "Where is the laptop relative to the mug?", OPTIONS, HALF_SIZE)
    finished = finish_result(request, answered(text=response(MUG_LAPTOP, RIGHT_OF)), OPTIONS, (1280, 960),
                             depth=DepthImage.from_metres(depth), intrinsics=K640)
    mug, laptop = finished.scene.objects
    assert laptop.position.ambiguous and not mug.position.ambiguous
    assert finished.parsed.status is AnswerStatus.COMPLETE
    assert finished.parsed.status_message == ("laptop.1: position ambiguous (two depth surfaces in its box could be "
                                              "the object)")


def test_a_reading_not_made_at_the_written_letter_says_how_it_was_made():
    request = prepare_request(camera_image(), "Where is the laptop relative to the mug?", OPTIONS, HALF_SIZE)
    note = "read one step further, as if \"(\" followed: the model wrote no option letter"
    result = InferenceResult(text=response(MUG_LAPTOP, RIGHT_OF, answer="right of"), option_probabilities=(0.3, 0.7),
                             option_probabilities_note=note)
    finished = finish_result(request, result, OPTIONS, (1280, 960))
    assert finished.parsed.option_probabilities == (0.3, 0.7) and finished.parsed.status is AnswerStatus.COMPLETE
    assert finished.parsed.status_message == f"option probabilities {note}"


def test_geometry_losses_turn_complete_into_partial():
    objects = MUG_LAPTOP + [{"id": "lamp.1", "bbox": [700, 10, 760, 90]}]
    relations = RIGHT_OF + [{"subject": "lamp.1", "predicate": "behind", "object": "laptop.1"}]
    depth = depth_640()
    depth[150:300, 300:500] = np.nan     # the laptop's screen reflects: no depth
    request = prepare_request(camera_image(), "Where is the laptop relative to the mug?", OPTIONS, HALF_SIZE)
    finished = finish_result(request, answered(text=response(objects, relations)), OPTIONS, (1280, 960),
                             depth=DepthImage.from_metres(depth), intrinsics=K640)
    parsed = finished.parsed
    assert parsed.status is AnswerStatus.PARTIAL and parsed.choice == "B"
    assert [o.id for o in finished.scene.objects] == ["mug.1", "laptop.1"]
    assert len(finished.scene.relations) == 1
    assert parsed.problems == (
        "objects dropped because their boxes are empty or outside the 640x480 image: lamp.1 "
        "(1 relation removed with them)",
        "depth invalid inside the box of laptop.1: no 3D position",
    )
    assert finished.scene.objects[0].position.z == pytest.approx(0.8)
    assert finished.scene.objects[1].position is None


def test_a_box_clamped_to_the_image_is_said_without_changing_the_status():
    objects = MUG_LAPTOP + [{"id": "lamp.1", "bbox": [600, 400, 700, 500]}]   # the model's image is 640x480
    request = prepare_request(camera_image(), "Where is the laptop relative to the mug?", OPTIONS, HALF_SIZE)
    finished = finish_result(request, answered(text=response(objects, RIGHT_OF)), OPTIONS, (1280, 960))
    parsed = finished.parsed
    assert parsed.status is AnswerStatus.COMPLETE and parsed.choice == "B"
    lamp = finished.scene.objects[2].box
    assert (lamp.x_min, lamp.y_min, lamp.x_max, lamp.y_max) == (1200, 800, 1280, 960)
    assert parsed.status_message == "box of lamp.1 reached outside the 640x480 image and was clamped to it"


def test_depth_without_intrinsics_is_reported():
    request = prepare_request(camera_image(640, 480), "Where?", OPTIONS)
    finished = finish_result(request, answered(text=response(MUG_LAPTOP)), OPTIONS, (640, 480),
                             depth=DepthImage.from_metres(depth_640()))
    assert finished.parsed.problems == ("a depth image came without camera intrinsics: no 3D positions",)
    assert finished.parsed.status is AnswerStatus.PARTIAL


def test_parse_problems_are_kept_and_all_dropped_objects_without_answer_is_no_answer():
    request = prepare_request(camera_image(640, 480), "Where?", OPTIONS)
    text = response([{"id": "lamp.1", "bbox": [700, 10, 760, 90]}]).split("<think>")[0]
    finished = finish_result(request, answered(text=text), OPTIONS, (640, 480))
    assert finished.parsed.status is AnswerStatus.NO_ANSWER
    assert finished.parsed.problems[:2] == ("no <think> section", "no <answer> section")
    assert finished.parsed.problems[2].startswith("objects dropped because")


def test_scene_only_request_is_complete_without_think_and_answer():
    request = prepare_request(camera_image(), "Find the mug and the laptop.", [], HALF_SIZE, scene_only=True)
    finished = finish_result(request, answered(text=response(MUG_LAPTOP, RIGHT_OF, scene_only=True)), [],
                             (1280, 960), depth=DepthImage.from_metres(depth_640()), intrinsics=K640)
    assert finished.parsed.status is AnswerStatus.COMPLETE and finished.parsed.problems == ()
    assert finished.parsed.answer == "" and finished.parsed.choice == ""
    assert [o.position.z for o in finished.scene.objects] == pytest.approx([0.8, 1.2])


def test_streamed_scene_of_a_full_request_reads_as_scene_only():
    request = prepare_request(camera_image(), "Where is the laptop relative to the mug?", OPTIONS, HALF_SIZE)
    full = response(MUG_LAPTOP, RIGHT_OF)
    partial = full[: full.index("</scene>") + len("</scene>")] + "\n<think>The lap"
    streamed = finish_result(request, answered(text=partial), OPTIONS, (1280, 960), scene_only=True)
    assert streamed.parsed.status is AnswerStatus.COMPLETE
    assert streamed.parsed.problems == ("<think> not closed (output truncated?)",)
    assert [o.box.x_max for o in streamed.scene.objects] == [300, 1000]
    as_asked = finish_result(request, answered(text=partial), OPTIONS, (1280, 960))
    assert as_asked.parsed.status is AnswerStatus.PARTIAL
    assert as_asked.parsed.problems == ("<think> not closed (output truncated?)", "no <answer> section")


def test_option_probabilities_are_carried_or_their_absence_explained():
    request = prepare_request(np.zeros((480, 640, 3), np.uint8), "Where is the mug?", OPTIONS)
    text = response(MUG_LAPTOP, RIGHT_OF)
    carried = finish_result(request, answered(text=text), OPTIONS, (640, 480))
    assert carried.parsed.option_probabilities == (0.9, 0.1) and carried.parsed.problems == ()
    absent = finish_result(request, InferenceResult(text=text, option_probabilities_note="the server said no"),
                           OPTIONS, (640, 480))
    assert absent.parsed.option_probabilities == ()
    assert absent.parsed.status_message == "no option probabilities: the server said no"
    assert absent.parsed.status is carried.parsed.status   # the answer itself is whole
    wrong = finish_result(request, InferenceResult(text=text, option_probabilities=(0.2, 0.3, 0.5)), OPTIONS,
                          (640, 480))
    assert wrong.parsed.option_probabilities == ()
    assert wrong.parsed.status_message == "no option probabilities: the backend gave 3 for 2 options"
    free_form = finish_result(prepare_request(np.zeros((480, 640, 3), np.uint8), "What is it?", []),
                              InferenceResult(text=text, option_probabilities=(1.0,)), [], (640, 480))
    assert (free_form.parsed.option_probabilities, free_form.parsed.problems) == ((), ())
