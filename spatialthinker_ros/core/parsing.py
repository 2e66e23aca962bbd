"""Recovering what we can from SpatialThinker's raw output, which is untrusted and often imperfect.

The model writes <observe>, <scene> (JSON scene graph), <think> and <answer> sections. Sampled or truncated
outputs break this in many ways (see the notes), and a robot is better served by half an answer with a clear
message than by an exception, so parsing never raises: every loss is written down as a problem.

Problems are of two kinds. A *loss* means something the model was asked for is missing or unusable: a
missing, empty or unclosed section, a dropped object or relation, a truncated list, an answer that names no
option or contradicts itself. A *note* records a repair that kept the content: malformed JSON that was
repaired, swapped box corners, a section given twice (the first complete one is used), a missing opening
tag whose closing tag was found.

Status rule (`decide_status`, also used by the pipeline after geometry):
- NO_ANSWER: nothing usable, i.e. no answer text and no scene object (a scene-only request whose scene
  closed and parsed counts as usable even with no object: "nothing relevant" is an answer).
- COMPLETE: something usable and no loss. Every expected section is present (for scene_only requests
  <think> and <answer> are not expected), the scene is complete, nothing was dropped, and when options
  were given the answer names one.
- PARTIAL: something usable, but something was lost.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import json_repair

from spatialthinker_ros.core.prompt import option_letter, option_text
from spatialthinker_ros.core.text import excerpt
from spatialthinker_ros.core.types import (
    AnswerStatus,
    Box,
    ParsedResponse,
    SceneGraph,
    SceneObject,
    SceneRelation,
)

SECTIONS = ("observe", "scene", "think", "answer")
MAX_OBJECTS = 256
MAX_RELATIONS = 1024
MAX_PROBLEMS = 32   # messages kept; the rest are counted, so a degenerate output cannot flood status_message

_TAG_RE = re.compile(r"<\s*(/?)\s*(observe|scene|think|answer)\s*>", re.IGNORECASE)
_SCENE_END_RE = re.compile(r"<\s*/\s*scene\s*>", re.IGNORECASE)
_ID_SUFFIX_RE = re.compile(r"\.\d+$")
# "B", "(B)", "(B) text", "B) text", "B. text", "B: text"; never "A cup".
_LETTER_RE = re.compile(r"\(\s*([a-z])\s*\)[\s.:)]*(.*)|([a-z])(?:\s*[).:][\s.:)]*(.*))?", re.IGNORECASE | re.DOTALL)
_PAREN_LETTER_RE = re.compile(r"\(([A-Z])\)")


class _Problems:
    """Collects problem messages and whether any of them lost content."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.dropped_messages = 0
        self.lossy = False

    def loss(self, message: str) -> None:
        self.lossy = True
        self.note(message)

    def note(self, message: str) -> None:
        if len(self.messages) < MAX_PROBLEMS:
            self.messages.append(message)
        else:
            self.dropped_messages += 1

    def as_tuple(self) -> tuple[str, ...]:
        more = (f"... and {self.dropped_messages} more problems",) if self.dropped_messages else ()
        return tuple(self.messages) + more


@dataclass(frozen=True)
class _Section:
    text: str
    closed: bool
    opened_at: Optional[int] = None   # where its opening tag starts in the output; None without one


def decide_status(answer: str, scene: SceneGraph, scene_complete: bool, scene_only: bool, lossy: bool) -> AnswerStatus:
    """The status rule of the module docstring, shared with the pipeline."""
    usable = bool(answer) or bool(scene.objects) or (scene_only and scene_complete)
    if not usable:
        return AnswerStatus.NO_ANSWER
    return AnswerStatus.PARTIAL if lossy else AnswerStatus.COMPLETE


def scene_text_complete(text: str) -> bool:
    """Whether streamed text has closed its scene, so a scene-only request can stop generating."""
    return _SCENE_END_RE.search(text) is not None


def parse_response(
    text: str,
    options: Sequence[str] = (),
    image_size: Optional[tuple[int, int]] = None,
    scene_only: bool = False,
) -> ParsedResponse:
    """Everything recoverable from one raw output. Boxes stay in the pixels of the prompt's image size.

    Also serves partial (streamed) text: pass it with scene_only=True to read the scene as soon as
    `scene_text_complete` says it is there.
    """
    try:
        return _parse(text, options, image_size or (0, 0), scene_only)
    except Exception as exc:  # noqa: BLE001 - last resort: parsing must never take down the caller
        return ParsedResponse(
            observation="", scene=SceneGraph(image_size=image_size or (0, 0)), scene_complete=False,
            reasoning="", answer="", choice="", status=AnswerStatus.NO_ANSWER,
            problems=(f"internal parser error ({type(exc).__name__}); output ignored",),
        )


def _parse(text: str, options: Sequence[str], image_size: tuple[int, int], scene_only: bool) -> ParsedResponse:
    problems = _Problems()
    expected = ("observe", "scene") if scene_only else SECTIONS
    sections = _split_sections(text, expected, problems)
    for name in expected:
        if name not in sections:
            problems.loss(f"no <{name}> section")

    scene, scene_complete = _parse_scene(sections.get("scene"), image_size, problems)
    answer_section = sections.get("answer")
    answer = answer_section.text.strip() if answer_section else ""
    if answer_section and not answer and not scene_only:
        problems.loss("the <answer> section is empty")
    choice = _choose(answer, options, problems) if answer and options else ""
    observe, think = sections.get("observe"), sections.get("think")
    return ParsedResponse(
        observation=observe.text.strip() if observe else "",
        scene=scene,
        scene_complete=scene_complete,
        reasoning=think.text.strip() if think else "",
        answer=answer,
        choice=choice,
        status=decide_status(answer, scene, scene_complete, scene_only, problems.lossy),
        problems=problems.as_tuple(),
    )


# ---- sections -------------------------------------------------------------------------------------------


def answer_opened_at(text: str) -> Optional[int]:
    """Where the <answer> tag opens that parse_response takes the answer from (so a probe reads the option letter
    there, not at an <answer> quoted in <think>); None when the output has none yet."""
    section = _split_sections(text, (), _Problems()).get("answer")
    return section.opened_at if section else None


def _split_sections(text: str, expected: Sequence[str], problems: _Problems) -> dict[str, _Section]:
    """Each tag's first complete <tag>...</tag>; an unclosed tag runs to the next opening tag or the end
    (a loss only for an expected section: a scene-only request may stop just after opening <think>)."""
    tags = [(m.start(), m.end(), m.group(1) == "/", m.group(2).lower()) for m in _TAG_RE.finditer(text)]
    # tags inside the first complete <think> ... </think> are its text: reasoning that quotes the card's example
    # "<answer> (A) cat </answer>" has not answered
    think = [i for i, (_, _, _, tag) in enumerate(tags) if tag == "think"]
    inside = next(((a, b) for a, b in zip(think, think[1:]) if not tags[a][2] and tags[b][2]), None)
    if inside:
        tags = [t for i, t in enumerate(tags) if not inside[0] < i < inside[1]]
    sections: dict[str, _Section] = {}
    for name in SECTIONS:
        own = [(i, closing) for i, (_, _, closing, tag) in enumerate(tags) if tag == name]
        if not own:
            continue
        openings = sum(1 for _, closing in own if not closing)
        if max(openings, len(own) - openings) > 1:
            problems.note(f"<{name}> appears more than once; the first complete one is used")
        pairs = zip(own, own[1:])
        pair = next(((a, b) for (a, a_closing), (b, b_closing) in pairs if not a_closing and b_closing), None)
        if pair:
            sections[name] = _Section(text[tags[pair[0]][1]:tags[pair[1]][0]], closed=True,
                                      opened_at=tags[pair[0]][0])
        elif openings:
            first = next(i for i, closing in own if not closing)
            end = next((start for start, _, closing, _ in tags[first + 1:] if not closing), len(text))
            sections[name] = _Section(text[tags[first][1]:end], closed=False, opened_at=tags[first][0])
            (problems.loss if name in expected else problems.note)(f"<{name}> not closed (output truncated?)")
        else:
            # Only the closing tag: the section starts after the previous tag (often the model skips "<observe>").
            close = own[0][0]
            start = tags[close - 1][1] if close else 0
            sections[name] = _Section(text[start:tags[close][0]], closed=True)
            problems.note(f"<{name}> opening tag missing")
    return sections


# ---- scene ----------------------------------------------------------------------------------------------


def _parse_scene(
    section: Optional[_Section], image_size: tuple[int, int], problems: _Problems
) -> tuple[SceneGraph, bool]:
    if section is None:
        return SceneGraph(image_size=image_size), False
    value, repaired = _load_json(section.text)
    raw_objects, raw_relations = _scene_lists(value)
    if raw_objects is None:
        problems.loss("the <scene> section holds no scene graph JSON")
        return SceneGraph(image_size=image_size), False
    if repaired:
        problems.note("the scene JSON was malformed and has been repaired")
    objects = _parse_objects(raw_objects, problems)
    relations = _parse_relations(raw_relations, {o.id for o in objects}, problems)
    return SceneGraph(objects=objects, relations=relations, image_size=image_size), section.closed


def _load_json(text: str) -> tuple[Any, bool]:
    """(value, whether it needed repair). Deep nesting makes both parsers recurse too far: treat as no JSON."""
    try:
        return json.loads(text), False
    except (ValueError, RecursionError):
        pass
    try:
        return json_repair.loads(text), True
    except (ValueError, RecursionError):
        return None, False


def _scene_lists(value: Any) -> tuple[Optional[list], list]:
    """(objects, relations) from the shapes the model writes: {"objects", "relationships" | "relations"}
    or a bare list of objects. Several concatenated JSON values come back as a list: use the first graph."""
    if isinstance(value, list):
        graph = next((v for v in value if isinstance(v, dict) and "objects" in v), None)
        if graph is None:
            return value, []
        value = graph
    if not isinstance(value, dict) or not isinstance(value.get("objects"), list):
        return None, []
    relations = value.get("relationships", value.get("relations", []))
    return value["objects"], relations if isinstance(relations, list) else []


def _parse_objects(raw: list, problems: _Problems) -> tuple[SceneObject, ...]:
    if len(raw) > MAX_OBJECTS:
        problems.loss(f"the scene lists {len(raw)} objects; only the first {MAX_OBJECTS} are kept")
    objects: dict[str, SceneObject] = {}
    for item in raw[:MAX_OBJECTS]:
        obj_id = item.get("id") if isinstance(item, dict) else None
        if not isinstance(obj_id, str) or not obj_id.strip():
            problems.loss(f"object without an id dropped: {excerpt(repr(item), 80)}")
            continue
        obj_id = obj_id.strip()
        if obj_id in objects:
            problems.loss(f"duplicate object {obj_id} dropped (the first one is kept)")
            continue
        box = _parse_box(item.get("bbox", item.get("bbox_2d")), obj_id, problems)
        if box is not None:
            objects[obj_id] = SceneObject(id=obj_id, label=object_label(obj_id), box=box)
    return tuple(objects.values())


def object_label(obj_id: str) -> str:
    """"coffee_mug.2" -> "coffee mug": the class name the model used, for people and markers."""
    return _ID_SUFFIX_RE.sub("", obj_id).replace("_", " ").strip() or obj_id


def _parse_box(raw: Any, obj_id: str, problems: _Problems) -> Optional[Box]:
    values = [_number(v) for v in raw] if isinstance(raw, list) and len(raw) == 4 else None
    if values is None or any(v is None for v in values):
        problems.loss(f"object {obj_id} dropped: bbox is not four numbers ({excerpt(repr(raw), 80)})")
        return None
    x1, y1, x2, y2 = values
    if x2 < x1 or y2 < y1:
        problems.note(f"object {obj_id}: bbox corners were out of order and have been swapped")
    return Box(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _parse_relations(raw: list, known_ids: set[str], problems: _Problems) -> tuple[SceneRelation, ...]:
    if len(raw) > MAX_RELATIONS:
        problems.loss(f"the scene lists {len(raw)} relationships; only the first {MAX_RELATIONS} are kept")
    relations = []
    for item in raw[:MAX_RELATIONS]:
        if isinstance(item, dict):
            parts = [item.get("subject"), item.get("predicate"), item.get("object")]
        else:
            parts = list(item) if isinstance(item, list) and len(item) == 3 else []
        if len(parts) != 3 or not all(isinstance(p, str) and p.strip() for p in parts):
            problems.loss(f"malformed relationship dropped: {excerpt(repr(item), 80)}")
            continue
        subject, predicate, obj = (p.strip() for p in parts)
        unknown = [i for i in (subject, obj) if i not in known_ids]
        if unknown:
            problems.loss(f"relation {subject} {predicate} {obj} dropped: unknown object {', '.join(unknown)}")
            continue
        relations.append(SceneRelation(subject=subject, predicate=predicate, object=obj))
    return tuple(relations)


# ---- answer ---------------------------------------------------------------------------------------------


def choose_option(answer: str, options: Sequence[str]) -> str:
    """The option letter an answer text ("B", "(B)", "(B) behind", "behind", ...) names, or "" when it names
    none or several: the rule the model's answers are scored by, also used to read a benchmark's answer key."""
    return _choose(answer, options, _Problems()) if answer.strip() and options else ""


def _choose(answer: str, options: Sequence[str], problems: _Problems) -> str:
    """The option letter the answer names, or "" (never a default: guessing "A" would be a wrong answer)."""
    letters = [option_letter(i) for i in range(len(options))]
    normalised = [_normalise(option_text(i, o)) for i, o in enumerate(options)]
    letter, rest = _leading_letter(answer)
    if letter in letters:
        text = _normalise(rest)
        named = [letters[i] for i, o in enumerate(normalised) if o == text]
        if text and named and letter not in named:
            problems.loss(f"answer letter {letter} disagrees with its text {rest.strip()!r} (option {named[0]})")
        return letter
    text = _normalise(rest if letter else answer)
    for candidates in (
        [letters[i] for i, o in enumerate(normalised) if o == text],
        sorted({m for m in _PAREN_LETTER_RE.findall(answer) if m in letters}),
        [letters[i] for i, o in enumerate(normalised) if o and f" {o} " in f" {text} "],
    ):
        if len(candidates) == 1:
            return candidates[0]
    problems.loss("answer does not name one of the options")
    return ""


def _leading_letter(answer: str) -> tuple[str, str]:
    match = _LETTER_RE.fullmatch(answer.strip())
    if not match:
        return "", ""
    return (match.group(1) or match.group(3)).upper(), match.group(2) or match.group(4) or ""


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())
