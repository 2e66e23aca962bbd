import pytest

from spatialthinker_ros.core.prompt import MODEL_CARD_INSTRUCTION, PromptConfig, build_prompt, option_letter
from spatialthinker_ros.core.request import InvalidRequest, check_question


def prompt_for(question, options, size, config=PromptConfig()) -> str:
    """As the pipeline words a request: the question checked once (request.py), then the prompt built once."""
    return build_prompt(check_question(question, options, config), size, config)

CARD_TEXT = (
    "You FIRST observe the image in <observe> </observe> tags, then visualise the relevant scene graph in <scene> "
    "</scene> tags, followed by thinking about the reasoning process as an internal monologue within <think> "
    "</think> tags and then provide the final answer. The final answer MUST BE put within <answer> </answer> tags, "
    "and only return the final choice including the correct option and answer within the answer tags, e.g., "
    "<answer> (A) cat </answer>."
)


def test_model_card_prompt_is_the_documented_template():
    prompt = prompt_for("Where is the cat relative to the couch?", ["on top of", "in front of"], (640, 480))
    assert MODEL_CARD_INSTRUCTION == CARD_TEXT
    assert prompt == (
        CARD_TEXT + "\n\nImage size: 640 x 480\n\n"
        "Where is the cat relative to the couch? (A) on top of (B) in front of"
    )


def test_question_is_stripped_and_kept_as_is_without_options():
    question = "Where is the cat? (A) on top of (B) in front of"
    prompt = prompt_for(f"  {question}\n", [], (644, 476))
    assert prompt.endswith("\n\nImage size: 644 x 476\n\n" + question)


def test_option_whitespace_is_collapsed_to_keep_the_inline_list():
    prompt = prompt_for("Which is closer?", ["  the\nchair ", "lamp"], (640, 480))
    assert prompt.endswith("Which is closer? (A) the chair (B) lamp")


def test_training_style_uses_parenthesised_size_and_q_line():
    prompt = prompt_for("Which is closer to the camera?", ["chair", "lamp"], (1288, 728),
                          PromptConfig(style="training"))
    assert prompt.endswith(
        "\n\nImage size: (1288 x 728)\n\nNow answer the following question:\n\n"
        "Q. Which is closer to the camera?\nOptions: (A) chair (B) lamp"
    )
    for required in ("<observe>", "</observe>", "<scene>", "</scene>", "<think>", "</think>", "<answer>",
                     '"objects"', '"relationships"', '"bbox": [x1, y1, x2, y2]', '"subject"', '"predicate"',
                     "object_name.number"):
        assert required in prompt
    assert "Image size: 1288 x 728" not in prompt


def test_option_letters():
    assert [option_letter(i) for i in (0, 1, 25)] == ["A", "B", "Z"]
    for bad in (-1, 26):
        with pytest.raises(ValueError):
            option_letter(bad)


def test_twenty_six_options_get_letters_a_to_z():
    prompt = prompt_for("Pick one.", [f"o{i}" for i in range(26)], (10, 10))
    assert prompt.endswith("(Y) o24 (Z) o25")


@pytest.mark.parametrize(
    "question, options, size, config, message",
    [
        ("", [], (640, 480), PromptConfig(), "question is empty"),
        (" \n\t ", [], (640, 480), PromptConfig(), "question is empty"),
        ("x" * 2001, [], (640, 480), PromptConfig(), "2001 characters"),
        ("What?", ["a", "b", "c"], (640, 480), PromptConfig(max_options=2), "3 options given"),
        ("What?", ["a", "  "], (640, 480), PromptConfig(), "option B is empty"),
        ("What?", ["a", "b" * 201], (640, 480), PromptConfig(), "option B is 201 characters"),
        ("What?", "ab", (640, 480), PromptConfig(), "not one string"),
        ("What?", [], (0, 480), PromptConfig(), "image size must be positive"),
        ("What?", [], (640, -1), PromptConfig(), "image size must be positive"),
    ],
)
def test_invalid_requests_are_rejected_with_a_reason(question, options, size, config, message):
    # the question's faults are the caller's (InvalidRequest); a non-positive size is the program's (ValueError)
    with pytest.raises(ValueError if "image size" in message else InvalidRequest, match=message):
        prompt_for(question, options, size, config)


def test_options_passed_with_their_own_labels_are_labelled_once():
    prompt = prompt_for("Which is closer?", ["(A) the chair", "(b)lamp", "(A) table"], (640, 480))
    # a label of another letter is part of the option's text
    assert prompt.endswith("Which is closer? (A) the chair (B) lamp (C) (A) table")
    with pytest.raises(InvalidRequest, match="option A is empty"):
        prompt_for("Which is closer?", ["(A) ", "lamp"], (640, 480))


def test_limits_are_inclusive():
    config = PromptConfig(max_question_chars=5, max_options=2, max_option_chars=3)
    assert prompt_for("12345", ["abc", "def"], (1, 1), config).endswith("12345 (A) abc (B) def")


@pytest.mark.parametrize(
    "kwargs",
    [{"style": "eval"}, {"max_question_chars": 0}, {"max_options": 27}, {"max_options": -1}, {"max_option_chars": 0}],
)
def test_prompt_config_is_validated(kwargs):
    with pytest.raises(ValueError):
        PromptConfig(**kwargs)
