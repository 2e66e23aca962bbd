"""The text SpatialThinker is asked: its instruction, the image size it must use for boxes, the question.

The model answers boxes in pixels of the image size stated here, so the size must be that of the image the
backend actually hands to the model (pipeline.prepare_request passes it). The question and options arrive
checked and cleaned (request.check_question): this module only words them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
STYLES = ("model_card", "training")

# The inference template of the model card, word for word.
MODEL_CARD_INSTRUCTION = (
    "You FIRST observe the image in <observe> </observe> tags, then visualise the relevant scene graph in "
    "<scene> </scene> tags, followed by thinking about the reasoning process as an internal monologue within "
    "<think> </think> tags and then provide the final answer. The final answer MUST BE put within <answer> "
    "</answer> tags, and only return the final choice including the correct option and answer within the "
    "answer tags, e.g., <answer> (A) cat </answer>."
)

# Our own wording of the training prompt's instruction block (same sections, id scheme and JSON shape).
TRAINING_INSTRUCTION = """\
You are given an image and a question about it. Answer by observing the image, localising the objects that \
matter for the question, and reasoning over a scene graph of them.
- In <observe> </observe> tags, describe the scene and name the objects relevant to the question.
- In <scene> </scene> tags, write the scene graph as JSON. Give each relevant object a unique id of the form \
"object_name.number" (e.g. "cup.1", "coffee_mug.2") and a bounding box [x1, y1, x2, y2] in pixel coordinates \
of the image. List the relationships between these objects that matter for the question.
- In <think> </think> tags, reason step by step as an internal monologue, using your observations and the \
scene graph.
- In <answer> </answer> tags, give only the final choice: the option letter and its text.
Output format:
<observe>
The image shows a cup standing on a table.
</observe>
<scene>
{
  "objects": [
    {"id": "cup.1", "bbox": [x1, y1, x2, y2]},
    {"id": "table.1", "bbox": [x1, y1, x2, y2]}
  ],
  "relationships": [
    {"subject": "cup.1", "predicate": "on", "object": "table.1"}
  ]
}
</scene>
<think>
Step-by-step reasoning from the observations and the scene graph.
</think>
<answer> (A) answer text </answer>"""


@dataclass(frozen=True)
class PromptConfig:
    """Which prompt variant to use, and how large a question may be (request.check_question enforces it)."""

    style: str = "model_card"
    max_question_chars: int = 2000
    max_options: int = 26
    max_option_chars: int = 200

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"prompt style must be one of {', '.join(STYLES)}, not {self.style!r}")
        if self.max_question_chars < 1:
            raise ValueError(f"max_question_chars must be at least 1, not {self.max_question_chars}")
        if not 0 <= self.max_options <= len(_LETTERS):
            raise ValueError(f"max_options must be between 0 and {len(_LETTERS)}, not {self.max_options}")
        if self.max_option_chars < 1:
            raise ValueError(f"max_option_chars must be at least 1, not {self.max_option_chars}")


@dataclass(frozen=True)
class Question:
    """A question and its options as the prompt states them (made by request.check_question): trimmed, one line
    each, their own "(A)" labels removed."""

    text: str
    options: tuple[str, ...] = ()


def option_letter(i: int) -> str:
    """The letter the prompt gives the i-th option (0 -> "A")."""
    if not 0 <= i < len(_LETTERS):
        raise ValueError(f"option index must be between 0 and {len(_LETTERS) - 1}, not {i}")
    return _LETTERS[i]


def option_text(i: int, option: str) -> str:
    """The i-th option without a label of its own letter: callers often pass options already labelled ("(A) cat"),
    and the prompt labels them itself, so "(A) (A) cat" would reach the model and its answer "cat" match nothing."""
    match = re.match(rf"\s*\(\s*{option_letter(i)}\s*\)\s*", option, re.IGNORECASE)
    return option[match.end():] if match else option


# A label "(A)" .. "(Z)" that starts an option: at the start of the text or after a space or ":".
_LABEL_RE = re.compile(r"(?:(?<=^)|(?<=[\s:]))\(([A-Z])\)\s*")


def inline_options(question: str) -> list[str]:
    """The options a question carries in its own text, or [] when it carries none.

    Two forms are read, both as the authors write them: the model card's `... couch? (A) on top of (B) in
    front of` and the training data's own line `Options: (A) behind (B) in front of`. The options are the
    last line holding "(A)" followed by "(B)", "(C)", ... in order, each running to the next label (the
    last to the end of the line); fewer than two, or an empty one, is no option list.
    """
    for line in reversed(question.splitlines()):
        labels = list(_LABEL_RE.finditer(line))
        starts = [i for i, label in enumerate(labels) if label.group(1) == "A"]
        if not starts:
            continue
        run = [labels[starts[-1]]]
        for label in labels[starts[-1] + 1:]:
            if label.group(1) != option_letter(len(run)):
                break                       # "(B)" after "(A)" ...; anything else ends the list
            run.append(label)
        ends = [label.start() for label in run[1:]] + [len(line)]
        options = [line[label.end():end].strip() for label, end in zip(run, ends)]
        return options if len(options) >= 2 and all(options) else []
    return []


def answer_options(question: str, options: Sequence[str]) -> list[str]:
    """The options an answer is matched against: the list when given, else those written in the question."""
    return list(options) if options else inline_options(question)


def build_prompt(question: Question, image_size: tuple[int, int], config: PromptConfig = PromptConfig()) -> str:
    """The user-turn text that follows the image. `question` comes from request.check_question; `image_size` is
    (width, height) of the image the model sees."""
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, not {width} x {height}")
    labelled = " ".join(f"({option_letter(i)}) {option}" for i, option in enumerate(question.options))
    if config.style == "model_card":
        asked = f"{question.text} {labelled}" if question.options else question.text
        return f"{MODEL_CARD_INSTRUCTION}\n\nImage size: {width} x {height}\n\n{asked}"
    asked = f"{question.text}\nOptions: {labelled}" if question.options else question.text
    return (
        f"{TRAINING_INSTRUCTION}\n\nImage size: ({width} x {height})\n\n"
        f"Now answer the following question:\n\nQ. {asked}"
    )
