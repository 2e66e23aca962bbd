"""Answers about the bundled sample scene whose relations are true, false and borderline, with their verdicts.

One list for the core, CLI and node tests. The sample (scripts/make_sample_scene.py) has known object centres in
the optical frame: mug.1 (-0.19, -0.08, 0.79), plate.1 (0.07, 0.02, 0.74), book.1 (0.30, -0.23, 1.03).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import spatialthinker_ros

DATA = Path(spatialthinker_ros.__file__).parent / "data"       # the installed package's copy
META = json.loads((DATA / "sample_scene.json").read_text())
MODEL_BOXES = {name: META["objects"][name]["model_box"] for name in ("mug.1", "plate.1", "book.1", "table.1")}
QUESTION = "Which relations between the objects on the table hold?"
OPTIONS = ["left of", "right of"]

# (subject, predicate, object), the check's name (SceneRelation.CHECK_* / RelationCheck), why
RELATIONS = [
    (("mug.1", "left of", "plate.1"), "CONSISTENT", "true: the mug stands 0.26 m left of the plate"),
    (("book.1", "in front of", "plate.1"), "CONTRADICTED", "false: the book lies 0.29 m further back"),
    (("plate.1", "in front of", "mug.1"), "UNCERTAIN", "borderline: 0.06 m, within the objects' depth extents"),
    (("mug.1", "on top of", "table.1"), "NOT_CHECKED", "vertical: the camera frame does not know gravity"),
    (("mug.1", "next to", "plate.1"), "NOT_CHECKED", "outside the checked vocabulary"),
]
TRIPLES = [triple for triple, _, _ in RELATIONS]
EXPECTED = [verdict for _, verdict, _ in RELATIONS]


def answer_about(boxes: dict, relations, answer: str = "(A) left of") -> str:
    """A complete SpatialThinker answer (all four sections) with these boxes and relations."""
    scene = {"objects": [{"id": k, "bbox": v} for k, v in boxes.items()],
             "relationships": [{"subject": s, "predicate": p, "object": o} for s, p, o in relations]}
    return (f"<observe>A table with a mug, a plate and a book.</observe>\n<scene>{json.dumps(scene)}</scene>\n"
            f"<think>Compare the boxes.</think>\n<answer>{answer}</answer>")


SAMPLE_ANSWER = answer_about(MODEL_BOXES, TRIPLES)


def write_replay(path: Path) -> Path:
    """A replay file answering QUESTION with SAMPLE_ANSWER."""
    path.write_text(json.dumps({"question": QUESTION, "response": SAMPLE_ANSWER, "option_probabilities": [0.9, 0.1]})
                    + "\n")
    return path


_NOTE = re.compile(r"(?P<subject>\S+) (?P<axis>[xz])=(?P<s>[+-]?\d+\.\d\d) m, "
                   r"(?P<object>\S+) (?P=axis)=(?P<o>[+-]?\d+\.\d\d) m "
                   r"\(difference (?P<difference>\d+\.\d\d) m, margin (?P<margin>\d+\.\d\d) m\)")


def stated_positions(note: str, subject: str, axis: str, obj: str) -> tuple[float, float]:
    """The subject's and the object's coordinate along `axis` that a relation's check note states, after checking
    the note's form: both names, the axis, and a difference that is theirs. The tests compare these with the lifted
    positions and the scene's truth rather than pinning the lift's numbers."""
    match = _NOTE.match(note)
    assert match, note
    assert (match["subject"], match["axis"], match["object"]) == (subject, axis, obj), note
    s, o = float(match["s"]), float(match["o"])
    assert abs(float(match["difference"]) - abs(s - o)) <= 0.011, note
    return s, o
