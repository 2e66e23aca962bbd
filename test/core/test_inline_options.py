"""Options written in the question (the model card's "(A) ... (B) ..." and the training data's "Options:" line)
are read when no list is given, offered once when both are given, and fill `choice` (pipeline and the CLI)."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from spatialthinker_ros.core.pipeline import finish_result, prepare_request
from spatialthinker_ros.core.prompt import PromptConfig, answer_options, build_prompt, inline_options
from spatialthinker_ros.core.request import InvalidRequest, check_question
from spatialthinker_ros.core.types import InferenceResult
from spatialthinker_ros.testing.processes import installed_executable

CARD = "Where is the cat relative to the couch? (A) on top of (B) in front of (C) behind (D) beside"
TRAINING = "Where is the cat relative to the couch?\nOptions: (A) on top of (B) in front of (C) behind (D) beside"
FOUR = ["on top of", "in front of", "behind", "beside"]


@pytest.mark.parametrize("question,options", [
    (CARD, FOUR),
    (TRAINING, FOUR),
    ("Which is closer? (A) the mug (B) the plate\nAnswer with the letter.", ["the mug", "the plate"]),
    ("Which is closer, (A) the mug or (B) the plate?", ["the mug or", "the plate?"]),
    ("Is the cup in box (A)?", []),                     # one label is no option list
    ("Pick (A) red (C) blue", []),                      # letters out of order
    ("Pick (A) (B) blue", []),                          # an empty option
    ("Where is the mug?", []),
    ("Options:(A) up (B) down", ["up", "down"]),
])
def test_inline_options_are_read_from_both_forms(question, options):
    assert inline_options(question) == options


def test_answer_options_prefer_the_list():
    assert answer_options(CARD, ["x", "y"]) == ["x", "y"]
    assert answer_options(CARD, []) == FOUR


def prompt(question, options, style="model_card"):
    config = PromptConfig(style=style)
    return build_prompt(check_question(question, options, config), (640, 480), config)


def test_options_inline_and_as_list_are_offered_once():
    alone = prompt(CARD, [])
    assert alone.endswith("\n\nImage size: 640 x 480\n\n" + CARD)
    assert check_question(CARD, FOUR).options == ()
    assert prompt(CARD, FOUR) == alone
    assert prompt(CARD, [f"({chr(65 + i)}) {o}" for i, o in enumerate(FOUR)]) == alone
    assert prompt(CARD, ["On top of", " in  front of", "behind", "beside"]) == alone
    training = prompt(TRAINING, FOUR, style="training")
    assert training.endswith("Q. " + TRAINING) and training.count("(A)") == 2   # the example's answer and ours
    with pytest.raises(InvalidRequest, match=r"differ from the options list"):
        check_question(CARD, ["left", "right"])


@pytest.mark.parametrize("answer,choice", [("(B) in front of", "B"), ("in front of", "B"), ("C", "C"),
                                           ("under the couch", "")])
def test_pipeline_matches_answers_against_inline_options(answer, choice):
    rgb = np.zeros((48, 64, 3), np.uint8)
    request = prepare_request(rgb, CARD, [])
    result = finish_result(request, InferenceResult(text=f"<answer> {answer} </answer>"), [], camera_size=(64, 48))
    assert result.parsed.choice == choice
    if not choice:
        assert "answer does not name one of the options" in result.parsed.problems


def test_spatialthinker_ask_fills_choice_for_inline_options(tmp_path: Path):
    import spatialthinker_ros

    data = Path(spatialthinker_ros.__file__).parent / "data"
    replay = tmp_path / "replay.jsonl"
    replay.write_text(json.dumps({"question": TRAINING, "response": "<answer> behind </answer>"}) + "\n")
    done = subprocess.run([str(installed_executable("spatialthinker-ask")), "--backend", "replay",
                           "--replay-file", str(replay), "--image", str(data / "sample_scene.png"),
                           "--question", TRAINING], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["choice"] == "C"
