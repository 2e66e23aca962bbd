import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_profiles import examples

from spatialthinker_ros.core.parsing import (
    MAX_OBJECTS,
    answer_opened_at,
    MAX_PROBLEMS,
    MAX_RELATIONS,
    object_label,
    parse_response,
    scene_text_complete,
)
from spatialthinker_ros.core.types import AnswerStatus, ParsedResponse

CORPUS_FILE = Path(__file__).parents[1] / "data" / "responses.jsonl"
CORPUS = [json.loads(line) for line in CORPUS_FILE.read_text().splitlines()]
GOOD = [e for e in CORPUS if e["expect"]["status"] == "complete"]
STATUS = {"complete": AnswerStatus.COMPLETE, "partial": AnswerStatus.PARTIAL, "no_answer": AnswerStatus.NO_ANSWER}
TAGS = ["<observe>", "</observe>", "<scene>", "</scene>", "<think>", "</think>", "<answer>", "</answer>"]


def parse_entry(entry: dict) -> ParsedResponse:
    return parse_response(
        entry["response"], entry["options"], tuple(entry["image_size"]), scene_only=entry.get("scene_only", False)
    )


def scene_text(objects: list, relationships: list = ()) -> str:
    body = json.dumps({"objects": objects, "relationships": list(relationships)})
    return f"<observe>o</observe><scene>{body}</scene><think>t</think><answer>(A) x</answer>"


def test_corpus_is_large_and_varied():
    assert len(CORPUS) >= 25
    assert {e["expect"]["status"] for e in CORPUS} == set(STATUS)
    assert len({e["name"] for e in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("entry", CORPUS, ids=[e["name"] for e in CORPUS])
def test_corpus_expectations(entry):
    expect = entry["expect"]
    parsed = parse_entry(entry)
    assert parsed.status is STATUS[expect["status"]], parsed.problems
    assert parsed.choice == expect["choice"]
    assert [o.id for o in parsed.scene.objects] == expect["object_ids"]
    assert len(parsed.scene.relations) == expect["n_relations"]
    assert parsed.scene_complete is expect["scene_complete"]
    assert parsed.scene.image_size == tuple(entry["image_size"])
    assert len(parsed.problems) == len(expect["problem_substrings"]), parsed.problems
    for substring in expect["problem_substrings"]:
        assert any(substring in p for p in parsed.problems), (substring, parsed.problems)


def test_model_card_example_in_full():
    parsed = parse_entry(next(e for e in CORPUS if e["name"] == "model_card_example"))
    assert parsed.observation.startswith("The image shows a living room")
    assert parsed.reasoning.startswith("Looking at the scene graph")
    assert parsed.reasoning.endswith("in front of the couch.")
    assert parsed.answer == "(B) in front of the couch"
    cat = parsed.scene.objects[1]
    assert (cat.id, cat.label) == ("cat.1", "cat")
    assert (cat.box.x_min, cat.box.y_min, cat.box.x_max, cat.box.y_max) == (200, 300, 280, 400)
    assert cat.position is None
    assert [(r.subject, r.predicate, r.object) for r in parsed.scene.relations] == [
        ("cat.1", "in front of", "couch.1"), ("cat.1", "beside", "table.1")]
    assert parsed.problems == () and parsed.status_message == ""


def test_boxes_keep_floats_strings_and_out_of_image_values_but_swap_corners():
    parsed = parse_response(scene_text([
        {"id": "a.1", "bbox": [10.5, "20.25", 700, 900]},
        {"id": "b.1", "bbox": [300, 200, 100, 50]},
    ]), ["x"], (640, 480))
    boxes = [(o.box.x_min, o.box.y_min, o.box.x_max, o.box.y_max) for o in parsed.scene.objects]
    assert boxes == [(10.5, 20.25, 700, 900), (100, 50, 300, 200)]


@pytest.mark.parametrize("bbox", [[1, 2, 3], [1, 2, 3, 4, 5], [1, 2, "x", 4], [1, True, 3, 4], None, "1,2,3,4",
                                  [1, 2, 3, float("nan")], [1, 2, "inf", 4], [1, 2, 3, 1e400]])
def test_invalid_boxes_are_dropped_with_the_id_named(bbox):
    text = scene_text([{"id": "cup.1", "bbox": [1, 2, 3, 4]}, {"id": "plate.2", "bbox": bbox}])
    parsed = parse_response(text.replace("Infinity", "1e400"), ["x"], (640, 480))
    assert [o.id for o in parsed.scene.objects] == ["cup.1"]
    assert any(p.startswith("object plate.2 dropped") for p in parsed.problems)
    assert parsed.status is AnswerStatus.PARTIAL


def test_objects_without_id_are_dropped():
    parsed = parse_response(scene_text([{"bbox": [1, 2, 3, 4]}, {"id": "  ", "bbox": [1, 2, 3, 4]}, "cup.1",
                                        {"id": 7, "bbox": [1, 2, 3, 4]}]), ["x"], (64, 48))
    assert parsed.scene.objects == ()
    assert sum("object without an id dropped" in p for p in parsed.problems) == 4


def test_qwen_bbox_2d_key_and_list_relations_are_accepted():
    body = ('{"objects": [{"id": "cup.1", "bbox_2d": [1, 2, 3, 4]}, {"id": "table.1", "bbox": [0, 0, 9, 9]}],'
            ' "relationships": [["cup.1", "on", "table.1"], ["cup.1", "on"], {"subject": "cup.1", "predicate": 3,'
            ' "object": "table.1"}]}')
    parsed = parse_response(f"<observe>o</observe><scene>{body}</scene><think>t</think><answer>A</answer>", ["x"])
    assert [o.id for o in parsed.scene.objects] == ["cup.1", "table.1"]
    assert [(r.subject, r.predicate, r.object) for r in parsed.scene.relations] == [("cup.1", "on", "table.1")]
    assert sum("malformed relationship dropped" in p for p in parsed.problems) == 2
    assert parsed.scene.image_size == (0, 0)


@pytest.mark.parametrize("obj_id, label", [("coffee_mug.2", "coffee mug"), ("cup.1", "cup"), ("cup", "cup"),
                                           ("traffic_light", "traffic light"), ("v1.2.10", "v1.2"), (".3", ".3")])
def test_labels(obj_id, label):
    assert object_label(obj_id) == label


def test_object_and_relation_caps():
    objects = [{"id": f"box.{i}", "bbox": [i, i, i + 1, i + 1]} for i in range(MAX_OBJECTS + 5)]
    relations = [{"subject": "box.0", "predicate": "near", "object": "box.1"}] * (MAX_RELATIONS + 1)
    parsed = parse_response(scene_text(objects, relations), ["x"], (640, 480))
    assert len(parsed.scene.objects) == MAX_OBJECTS
    assert parsed.scene.objects[-1].id == f"box.{MAX_OBJECTS - 1}"
    assert len(parsed.scene.relations) == MAX_RELATIONS
    assert f"the scene lists {MAX_OBJECTS + 5} objects; only the first {MAX_OBJECTS} are kept" in parsed.problems
    assert (f"the scene lists {MAX_RELATIONS + 1} relationships; only the first {MAX_RELATIONS} are kept"
            in parsed.problems)
    assert parsed.status is AnswerStatus.PARTIAL


def test_problem_messages_are_capped_but_counted():
    relations = [{"subject": "a.1", "predicate": "near", "object": f"ghost.{i}"} for i in range(100)]
    parsed = parse_response(scene_text([{"id": "a.1", "bbox": [1, 2, 3, 4]}], relations), ["x"], (640, 480))
    assert len(parsed.problems) == MAX_PROBLEMS + 1
    assert parsed.problems[-1] == f"... and {100 - MAX_PROBLEMS} more problems"


def test_deeply_nested_scene_is_a_problem_not_an_error():
    text = "<observe>o</observe><scene>" + "[" * 5000 + "</scene><think>t</think><answer>(A) x</answer>"
    parsed = parse_response(text, ["x"], (640, 480))
    assert parsed.choice == "A"
    assert parsed.scene.objects == ()
    assert "the <scene> section holds no scene graph JSON" in parsed.problems
    assert parsed.status is AnswerStatus.PARTIAL


def test_concatenated_json_values_use_the_scene_graph():
    body = '{"objects": [{"id": "cup.1", "bbox": [1, 2, 3, 4]}], "relationships": []} {"note": 1}'
    parsed = parse_response(f"<observe>o</observe><scene>{body}</scene><think>t</think><answer>A</answer>", ["x"])
    assert [o.id for o in parsed.scene.objects] == ["cup.1"]
    assert parsed.status is AnswerStatus.COMPLETE


def test_first_complete_section_wins_over_an_earlier_unclosed_one():
    text = "<observe>o</observe><scene>[]</scene><think>t</think><answer>(A <answer> (B) far </answer>"
    parsed = parse_response(text, ["near", "far"])
    assert parsed.answer == "(B) far" and parsed.choice == "B"
    assert parsed.problems == ("<answer> appears more than once; the first complete one is used",)


def test_unclosed_section_stops_at_the_next_opening_tag():
    text = "<observe>a kitchen <scene>[]</scene><think>hmm</think><answer>B</answer>"
    parsed = parse_response(text, ["x", "y"])
    assert parsed.observation == "a kitchen"
    assert parsed.problems == ("<observe> not closed (output truncated?)",)
    assert parsed.status is AnswerStatus.PARTIAL


def test_empty_answer_section():
    parsed = parse_response("<observe>o</observe><scene>[]</scene><think>t</think><answer> </answer>", ["x"])
    assert parsed.answer == "" and parsed.choice == ""
    assert parsed.problems == ("the <answer> section is empty",)
    assert parsed.status is AnswerStatus.NO_ANSWER


@pytest.mark.parametrize(
    "answer, choice",
    [("b", "B"), ("(c).", "C"), ("C:", "C"), ("c: behind", "C"), ("(B): in front of", "B"), ("  BEHIND ", "C"),
     ("The couch is behind.", "C"), ("Behind", "C"), ("A", "A"), ("on top of it", "A")],
)
def test_choice_forms(answer, choice):
    parsed = parse_response(f"<answer>{answer}</answer>", ["on top of", "in front of", "behind"])
    assert parsed.choice == choice


@pytest.mark.parametrize("answer, choice", [("behind", "C"), ("(B) in front of", "B"), ("on top of", "A")])
def test_options_passed_with_their_own_labels_match_answers_by_text(answer, choice):
    parsed = parse_response(f"<answer>{answer}</answer>", ["(A) on top of", "(b)in front of", "( C ) behind"])
    assert parsed.choice == choice
    assert not [p for p in parsed.problems if "answer" in p], parsed.problems   # no mismatch, nothing unmatched


@pytest.mark.parametrize("answer", ["D", "(D) beside", "I am not sure", "left of or right of", "e.g. something"])
def test_no_default_choice_when_nothing_matches(answer):
    parsed = parse_response(f"<answer>{answer}</answer>", ["left of", "right of", "behind"])
    assert parsed.choice == ""
    assert "answer does not name one of the options" in parsed.problems


def test_scene_only_expects_no_think_or_answer():
    complete = "<observe>a mug</observe><scene>{\"objects\": [{\"id\": \"mug.1\", \"bbox\": [1, 2, 30, 40]}]}</scene>"
    parsed = parse_response(complete, image_size=(64, 48), scene_only=True)
    assert parsed.status is AnswerStatus.COMPLETE and parsed.problems == ()
    assert parse_response(complete, image_size=(64, 48)).status is AnswerStatus.PARTIAL

    empty = parse_response('<observe>nothing</observe><scene>{"objects": [], "relationships": []}</scene>',
                           scene_only=True)
    assert empty.status is AnswerStatus.COMPLETE and empty.scene_complete

    truncated = parse_response('<observe>a mug</observe><scene>{"objects": [', scene_only=True)
    assert truncated.status is AnswerStatus.NO_ANSWER
    assert "<scene> not closed (output truncated?)" in truncated.problems


def test_scene_text_complete_tracks_streamed_text():
    full = GOOD[0]["response"]
    end = full.index("</scene>")
    assert not scene_text_complete(full[:end])
    assert not scene_text_complete(full[: end + 5])
    assert scene_text_complete(full[: end + len("</scene>")])
    assert scene_text_complete("<scene>{}</ Scene >")


# ---- property tests --------------------------------------------------------------------------------------

FRAGMENTS = TAGS + ['{"objects": [', '{"id": "cup.1", "bbox": [', "1, 2, 3, 4]}", "]}", ",", "'", "NaN", "-1e999",
                    '"relationships": [{"subject": "cup.1", "predicate": "on", "object": "t.1"}]', "(A)", "B", "\n",
                    "[", "{", "}", "//", '"12.5"', " "]


def check_invariants(parsed: ParsedResponse, options: list) -> None:
    assert isinstance(parsed, ParsedResponse)
    assert isinstance(parsed.status, AnswerStatus)
    assert not any("internal parser error" in p for p in parsed.problems)
    assert parsed.choice in {"", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(options)]}
    assert len(parsed.scene.objects) <= MAX_OBJECTS and len(parsed.scene.relations) <= MAX_RELATIONS
    for obj in parsed.scene.objects:
        box = obj.box
        assert all(math.isfinite(v) for v in (box.x_min, box.y_min, box.x_max, box.y_max))
        assert box.x_min <= box.x_max and box.y_min <= box.y_max
    ids = {o.id for o in parsed.scene.objects}
    assert len(ids) == len(parsed.scene.objects)
    assert all(r.subject in ids and r.object in ids for r in parsed.scene.relations)
    usable = bool(parsed.answer) or bool(parsed.scene.objects)
    assert (parsed.status is AnswerStatus.NO_ANSWER) == (not usable)
    if parsed.status is AnswerStatus.COMPLETE:
        assert parsed.answer and parsed.scene_complete


@settings(max_examples=examples(300))
@given(st.one_of(st.text(), st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=5), max_size=40).map("".join)))
def test_random_text_never_raises(text):
    options = ["on", "under", "behind"]
    check_invariants(parse_response(text, options, (640, 480)), options)


@st.composite
def mutated_responses(draw):
    entry = draw(st.sampled_from(GOOD))
    text = entry["response"]
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "delete_tag", "duplicate_tag", "insert"]))
        present = [t for t in TAGS if t in text]
        if kind == "truncate":
            text = text[: draw(st.integers(0, len(text)))]
        elif kind in ("delete_tag", "duplicate_tag") and present:
            tag = draw(st.sampled_from(present))
            at = text.index(tag)
            text = text[:at] + (tag * 2 if kind == "duplicate_tag" else "") + text[at + len(tag):]
        else:
            at = draw(st.integers(0, len(text)))
            noise = st.text(st.characters(codec="utf-8") | st.sampled_from("{}[]\",:'<>/"), max_size=8)
            text = text[:at] + draw(noise) + text[at:]
    return text, entry["options"]


@settings(max_examples=examples(300))
@given(mutated_responses())
def test_mutated_good_responses_never_raise(case):
    text, options = case
    check_invariants(parse_response(text, options, (640, 480)), options)


def test_an_answer_quoted_in_think_is_not_the_answer():
    # the model echoes the card's example while reasoning; its own answer comes after </think>
    text = ('<observe> a cup </observe> <scene> {"objects": []} </scene> <think> The card writes '
            '<answer> (A) cat </answer>, but the cup is right of the plate. </think> <answer> (B) right of </answer>')
    parsed = parse_response(text, ["left of", "right of"], (640, 480))
    assert (parsed.answer, parsed.choice) == ("(B) right of", "B")
    assert "<answer> (A) cat </answer>" in parsed.reasoning
    assert not any("more than once" in p for p in parsed.problems)
    assert answer_opened_at(text) == text.rindex("<answer>")
    assert answer_opened_at("<think> no answer yet") is None
