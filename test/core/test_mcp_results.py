"""What spatialthinker_mcp's tools return, without ROS: the act-or-ask decision, option probabilities by letter,
the scene's fields, locate's matching and order, the size-capped annotated JPEG, and the output schemas."""

import cv2
import jsonschema
import numpy as np
import pytest

from spatialthinker_ros.core.types import (AnswerStatus, Box, ParsedResponse, Position3D, RelationCheck, SceneGraph,
                                          SceneObject, SceneRelation)
from spatialthinker_ros.mcp import results

FRAME = {"stamp": 12.5, "camera": "front", "frame_id": "front_optical"}
SCENE = SceneGraph(
    objects=(SceneObject("coffee_mug.1", "coffee mug", Box(10, 20, 60, 80),
                         Position3D(-0.2, 0.1, 1.5, 0.1, 0.1, 0.05, depth_spread=0.01, ambiguous=True)),
             SceneObject("mug.2", "mug", Box(100, 20, 160, 80), Position3D(0.3, 0.1, 0.9, 0.1, 0.1, 0.05)),
             SceneObject("plate.1", "plate", Box(50, 100, 200, 180))),
    relations=(SceneRelation("coffee_mug.1", "left of", "plate.1", RelationCheck.NOT_CHECKED, "plate.1 has no 3D"),),
    image_size=(640, 480))


def parsed(probabilities=(), answer="(A) left of", choice="A"):
    return ParsedResponse(observation="", scene=SCENE, scene_complete=True, reasoning="", answer=answer,
                          choice=choice, status=AnswerStatus.COMPLETE, option_probabilities=tuple(probabilities))


@pytest.mark.parametrize("offered, probabilities, prediction_set, coverage, expected", [
    (["left of", "right of"], [0.8, 0.2], ["A"], 0.9, "act"),
    (["left of", "right of"], [0.5, 0.5], ["A", "B"], 0.9, "ask_for_help"),
    (["a", "b", "c"], [0.34, 0.33, 0.33], [], 0.9, "ask_for_help"),
    (["left of", "right of"], [0.8, 0.2], [], 0.0, "uncalibrated"),      # no calibration
    (["left of", "right of"], [], [], 0.0, "uncalibrated"),              # a backend without probabilities
    ([], [], [], 0.0, "free_form"),
])
def test_the_decision_acts_only_on_a_calibrated_singleton(offered, probabilities, prediction_set, coverage, expected):
    assert results.decision(offered, probabilities, prediction_set, coverage) == expected


def test_ask_result_keys_probabilities_by_letter_with_the_option_text_and_validates_against_its_schema():
    result = results.ask_result(parsed([0.8, 0.2]), FRAME, "replay", 0.25, "Where is the mug?",
                                ["left of", "right of"], ["A"], 0.9)
    data = result.model_dump(mode="json")
    jsonschema.validate(data, results.AskSpatialResult.model_json_schema())
    assert data["option_probabilities"] == {"A": {"option": "left of", "probability": 0.8},
                                            "B": {"option": "right of", "probability": 0.2}}
    assert (data["decision"], data["prediction_set"], data["coverage"]) == ("act", ["A"], 0.9)
    assert (data["stamp"], data["camera"], data["model"], data["inference_time_s"]) == (12.5, "front", "replay", 0.25)
    mug, _, plate = data["objects"]
    assert mug == {"id": "coffee_mug.1", "label": "coffee mug",
                   "box": {"x_min": 10.0, "y_min": 20.0, "x_max": 60.0, "y_max": 80.0},
                   "position": {"x": -0.2, "y": 0.1, "z": 1.5}, "frame_id": "front_optical", "depth_spread": 0.01,
                   "depth_ambiguous": True}
    assert (plate["position"], plate["depth_spread"], plate["depth_ambiguous"]) == (None, 0.0, False)
    assert data["relations"] == [{"subject": "coffee_mug.1", "predicate": "left of", "object": "plate.1",
                                  "check": "not_checked", "note": "plate.1 has no 3D"}]


def test_options_written_in_the_question_are_offered_options():
    result = results.ask_result(parsed([0.3, 0.7], answer="(B) behind", choice="B"), FRAME, "replay", 0.1,
                                "Where is the mug? (A) in front (B) behind", [], [], 0.0)
    assert {k: v.option for k, v in result.option_probabilities.items()} == {"A": "in front", "B": "behind"}
    assert result.decision == "uncalibrated"
    free = results.ask_result(parsed(answer="on the table", choice=""), FRAME, "replay", 0.1, "Where is it?", [],
                              [], 0.0)
    assert (free.decision, free.option_probabilities) == ("free_form", {})


def test_locate_puts_label_matches_first_then_the_nearest_and_says_why_when_nothing_matches():
    scene = results.scene_result(parsed(), FRAME, "replay", 0.1)
    found = results.locate_result(scene, "the mug")
    assert [(m.id, m.match) for m in found.matches] == [("mug.2", "label"), ("coffee_mug.1", "label")]
    assert found.reason == ""
    assert [m.id for m in results.locate_result(scene, "tea mug").matches] == ["mug.2", "coffee_mug.1"]
    assert [(m.id, m.match) for m in results.locate_result(scene, "coffee cup").matches] == [("coffee_mug.1",
                                                                                              "word")]
    nothing = results.locate_result(scene, "a banana")
    assert nothing.matches == []
    assert nothing.reason == ("no object matches 'a banana'; the scene's objects: coffee_mug.1 (coffee mug), "
                              "mug.2 (mug), plate.1 (plate)")
    jsonschema.validate(nothing.model_dump(mode="json"), results.LocateResult.model_json_schema())
    assert results.locate_summary(nothing) == nothing.reason


def test_the_annotated_image_is_a_jpeg_under_the_cap_with_the_frame_size_when_it_fits():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)    # noise compresses worst
    small = results.annotated_jpeg(noise, SCENE, "caption", max_bytes=40_000)
    assert len(small) <= 40_000
    decoded = cv2.imdecode(np.frombuffer(small, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape[0] < 480, "noise at 640x480 does not fit 40 kB: halved"
    flat = np.full((480, 640, 3), 128, np.uint8)
    full = cv2.imdecode(np.frombuffer(results.annotated_jpeg(flat, SCENE, ""), np.uint8), cv2.IMREAD_COLOR)
    assert full.shape == (480, 640, 3)


def test_summaries_name_the_answer_the_decision_and_each_position():
    result = results.ask_result(parsed([0.8, 0.2]), FRAME, "replay", 0.25, "Where is the mug?",
                                ["left of", "right of"], ["A"], 0.9)
    assert results.ask_summary(result) == (
        "answer: (A) left of (A); decision: act (prediction set ['A'] at coverage 0.9). 3 objects on front: "
        "coffee_mug.1 at z 1.50 m, mug.2 at z 0.90 m, plate.1 (no depth); 1 relations")
    assert results.error_text("ERROR_UNKNOWN_CAMERA", "no camera 'x'") == "ERROR_UNKNOWN_CAMERA: no camera 'x'"


def test_a_calibration_setup_keeps_its_booleans_in_node_status():
    status = results.CalibrationStatus(coverage=0.9, threshold=0.6, rows=300,
                                       setup={"letters_continue": True, "max_input_pixels": 76800, "dtype": None})
    assert status.model_dump(mode="json")["setup"] == {"letters_continue": True, "max_input_pixels": 76800,
                                                       "dtype": None}
