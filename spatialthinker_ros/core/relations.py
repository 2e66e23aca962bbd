"""The model's relations checked against the measured 3D positions: which parts of an answer the depth confirms.

A vision-language model can state "mug.1 left of plate.1" when the mug stands to the right. With depth and
intrinsics every object has a centre and extent in the camera's optical frame (core/geometry.lift_box: x right,
y down, z forward, metres), so viewer-relative relations can be checked against measurement.

What is checked (the vocabulary, with the synonyms the model writes; case, underscores, hyphens and spacing do
not matter, and a leading "is"/"located" is ignored):

- lateral, the subject's x against the object's x: `left of` (left, to the left of, on the left of, on the left
  side of, ...) and `right of` (the same with right);
- depth, the subject's z against the object's z (distance from the camera along its optical axis, which is what a
  depth camera measures): `in front of` (in front, front of, closer to the camera than, nearer the camera than,
  closer than, nearer than) and `behind` (in back of, farther/further from the camera than, farther than, ...).

What is not checked, and says so in the note (`NOT_CHECKED`):

- vertical relations (above, over, below, beneath, under, underneath, on, on top of): the camera frame does not
  know which way gravity points, and a camera looking down at a table puts far objects higher in the image;
- bare `closer to` / `nearer to` / `farther from` / `further from`: a relation's object is another object, not
  the camera, and the training data's "distance" questions use these words for nearness to a referent object
  ("which object is closer to the cat?"), so "ball.1 closer to cat.1" is not a depth ordering;
- any other predicate (next to, near, holding, ...), and relations whose objects have no 3D position (no depth
  with the frame, or too little valid depth inside a box).

Margin rule. A difference counts only beyond a margin; within it the verdict is `UNCERTAIN`, never a
contradiction. Along the checked axis, for subject s and object o:

    margin = margin_m + extent_fraction * (half_extent_s + half_extent_o) + error_s + error_o

- `margin_m` (node parameter `relation_margin`, CLI `--relation-margin`, default 0.02 m): registration and
  calibration error, and how much of a difference is worth a verdict at all;
- boxes from the model are loose: each centre may be off by `extent_fraction` (0.25) of the object's half extent
  along that axis (x: the box's metric width; z: the depth spread inside the box; 0 = unknown adds nothing);
- depth noise of stereo and structured-light cameras grows with the square of range: sigma_z = k * z^2 with k =
  `depth_noise_per_m` (0.005 per metre: 5 mm at 1 m, 2 cm at 2 m, about RealSense D4xx class). On z that is the
  noise itself; on x, which is computed as (u - cx) * z / fx, a depth error scales x by the same ratio: k * |x| * z;
- the depth spread of the surface each position was taken from (Position3D.depth_spread, ~1 sigma of its depths)
  adds to that noise the same way: error = noise + spread on z, (noise + spread) * |x| / z on x.

Ambiguous positions. When the lift could not tell which of two depth surfaces of similar share in a box is the
object (Position3D.ambiguous), every checked relation naming that object is `UNCERTAIN`, whatever the numbers say,
and the note says why.

The check never changes the model's answer and never drops a relation; it only fills SceneRelation.check and
check_note, and the pipeline names contradicted relations in the status message.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, replace
from typing import Mapping, Optional

from spatialthinker_ros.core.depth_layers import DEPTH_NOISE_PER_M, depth_noise
from spatialthinker_ros.core.types import Position3D, RelationCheck, SceneGraph, SceneObject, SceneRelation


@dataclass(frozen=True)
class RelationCheckConfig:
    """Whether to check relations, and the margin rule's constants (see the module docstring)."""

    enabled: bool = True
    margin_m: float = 0.02
    extent_fraction: float = 0.25
    depth_noise_per_m: float = DEPTH_NOISE_PER_M

    def __post_init__(self) -> None:
        if not (math.isfinite(self.margin_m) and self.margin_m >= 0):
            raise ValueError(f"the relation margin must be a finite number of metres >= 0, not {self.margin_m}")
        if not 0 <= self.extent_fraction <= 1:
            raise ValueError(f"extent_fraction must be in [0, 1], not {self.extent_fraction}")
        if not (math.isfinite(self.depth_noise_per_m) and self.depth_noise_per_m >= 0):
            raise ValueError(f"depth_noise_per_m must be finite and >= 0, not {self.depth_noise_per_m}")


@dataclass(frozen=True)
class CheckedPredicate:
    """A predicate the positions can decide: subject coordinate minus object coordinate on `axis` has `sign`."""

    meaning: str     # the canonical form, e.g. "left of"
    axis: str        # "x" (lateral, right positive) or "z" (depth, forward positive)
    sign: int        # -1: the subject's coordinate is the smaller one


_CHECKED_SYNONYMS: dict[CheckedPredicate, tuple[str, ...]] = {
    CheckedPredicate("left of", "x", -1): (
        "left", "left of", "to the left", "to the left of", "on the left", "on the left of", "on the left side of",
        "to the left side of", "left side of", "at the left of"),
    CheckedPredicate("right of", "x", +1): (
        "right", "right of", "to the right", "to the right of", "on the right", "on the right of",
        "on the right side of", "to the right side of", "right side of", "at the right of"),
    CheckedPredicate("in front of", "z", -1): (
        "in front", "in front of", "front of", "closer to the camera than", "closer to camera than",
        "nearer to the camera than", "nearer the camera than", "nearer to camera than", "closer than", "nearer than"),
    CheckedPredicate("behind", "z", +1): (
        "behind", "in back of", "farther from the camera than", "further from the camera than",
        "farther from camera than", "further from camera than", "farther away than", "further away than",
        "farther than", "further than"),
}
CHECKED: dict[str, CheckedPredicate] = {
    synonym: predicate for predicate, synonyms in _CHECKED_SYNONYMS.items() for synonym in synonyms
}
VERTICAL = frozenset({"above", "over", "below", "beneath", "under", "underneath", "on", "on top of", "on top",
                      "atop"})
TO_A_REFERENT = frozenset({"closer to", "nearer to", "farther from", "further from"})
_FILLER = ("is ", "are ", "located ", "positioned ")
_SEPARATORS = re.compile(r"[\s_\-]+")

VERDICT_WORDS = {RelationCheck.NOT_CHECKED: "not checked", RelationCheck.CONSISTENT: "consistent",
                 RelationCheck.CONTRADICTED: "contradicted", RelationCheck.UNCERTAIN: "uncertain"}
# RGB, shared by the debug image and the RViz markers: contradicted stands out, confirmed reads as fine.
VERDICT_COLOURS = {RelationCheck.NOT_CHECKED: (255, 255, 255), RelationCheck.CONSISTENT: (40, 200, 40),
                   RelationCheck.CONTRADICTED: (235, 30, 30), RelationCheck.UNCERTAIN: (250, 190, 0)}


@functools.lru_cache(maxsize=4096)   # a model repeats a handful of predicates; answers are checked often
def normalise_predicate(predicate: str) -> str:
    """Lower case, underscores and hyphens as spaces, single spaces, no leading "is"/"located" or trailing dot."""
    text = _SEPARATORS.sub(" ", predicate.lower()).strip(" .,;:")
    stripped = True
    while stripped:
        stripped = False
        for filler in _FILLER:
            if text.startswith(filler):
                text, stripped = text[len(filler):], True
    return text


def checked_predicate(predicate: str) -> Optional[CheckedPredicate]:
    """What the predicate says about positions, or None when it is not in the checked vocabulary."""
    return CHECKED.get(normalise_predicate(predicate))


def check_scene(scene: SceneGraph, config: RelationCheckConfig = RelationCheckConfig(),
                has_depth: bool = True) -> SceneGraph:
    """The scene with every relation's check and check_note filled; objects, order and the rest unchanged.

    `has_depth` False: the frame came without depth, so no object can have a position (said in the note).
    """
    objects: dict[str, SceneObject] = {}
    for obj in scene.objects:
        objects.setdefault(obj.id, obj)
    relations = tuple(check_relation(r, objects, config, has_depth) for r in scene.relations)
    return replace(scene, relations=relations)


def check_relation(relation: SceneRelation, objects: Mapping[str, SceneObject],
                   config: RelationCheckConfig = RelationCheckConfig(), has_depth: bool = True) -> SceneRelation:
    """The relation with its verdict and the note behind it (see the module docstring for the rule)."""
    verdict, note = _verdict(relation, objects, config, has_depth)
    return SceneRelation(relation.subject, relation.predicate, relation.object, verdict, note)


def contradictions(scene: SceneGraph) -> list[str]:
    """One line per contradicted relation, for the answer's status message."""
    return [f"depth contradicts {r.subject} {r.predicate} {r.object}: {r.check_note}"
            for r in scene.relations if r.check is RelationCheck.CONTRADICTED]


def verdict_label(relation: SceneRelation) -> str:
    """The predicate with its verdict, and the reason when it is not plain agreement: for drawn labels."""
    word = VERDICT_WORDS[relation.check]
    if relation.check is RelationCheck.CONSISTENT:
        return f"{relation.predicate} ({word})"
    if relation.check is RelationCheck.NOT_CHECKED:
        return relation.predicate
    return f"{relation.predicate} ({word}: {relation.check_note})"


def margin(axis: str, subject: Position3D, obj: Position3D, config: RelationCheckConfig = RelationCheckConfig()
           ) -> float:
    """Metres a difference along `axis` must exceed to count (the module docstring's rule)."""
    if axis == "x":
        half_extents = (subject.size_x + obj.size_x) / 2
        error = sum(_depth_error(p, config) * abs(p.x) / p.z for p in (subject, obj) if p.z > 0)
    elif axis == "z":
        half_extents = (subject.size_z + obj.size_z) / 2
        error = _depth_error(subject, config) + _depth_error(obj, config)
    else:
        raise ValueError(f"axis must be 'x' or 'z', not {axis!r}")
    return config.margin_m + config.extent_fraction * half_extents + error


def _depth_error(position: Position3D, config: RelationCheckConfig) -> float:
    """How far the measured depth of a position may be off: the sensor's noise at its range plus the spread of the
    surface it was taken from."""
    return depth_noise(position.z, config.depth_noise_per_m) + position.depth_spread


def _verdict(relation: SceneRelation, objects: Mapping[str, SceneObject], config: RelationCheckConfig,
             has_depth: bool) -> tuple[RelationCheck, str]:
    if not config.enabled:
        return RelationCheck.NOT_CHECKED, "relation checks are off (check_relations)"
    words = normalise_predicate(relation.predicate)
    predicate = CHECKED.get(words)
    if predicate is None:
        if words in VERTICAL:
            return RelationCheck.NOT_CHECKED, ("vertical relation: the camera frame does not know which way "
                                               "gravity points")
        if words in TO_A_REFERENT:
            return RelationCheck.NOT_CHECKED, (f"'{words}' compares distances to {relation.object}, not to the "
                                               "camera: two positions cannot decide it")
        return RelationCheck.NOT_CHECKED, f"'{words}' is not in the checked vocabulary"
    if not has_depth:
        return RelationCheck.NOT_CHECKED, "no depth with this frame: no 3D positions"
    subject, obj = objects.get(relation.subject), objects.get(relation.object)
    unlocated = [name for name, o in ((relation.subject, subject), (relation.object, obj))
                 if o is None or o.position is None]
    if unlocated:
        return RelationCheck.NOT_CHECKED, f"no 3D position for {' and '.join(unlocated)} (too little valid depth)"
    s, o = subject.position, obj.position
    axis = predicate.axis
    s_value, o_value = (s.x, o.x) if axis == "x" else (s.z, o.z)
    difference = s_value - o_value
    allowed = margin(axis, s, o, config)
    value = "{:+.2f}" if axis == "x" else "{:.2f}"
    note = (f"{relation.subject} {axis}={value.format(s_value)} m, {relation.object} {axis}={value.format(o_value)} m"
            f" (difference {abs(difference):.2f} m, margin {allowed:.2f} m)")
    ambiguous = [name for name, p in ((relation.subject, s), (relation.object, o)) if p.ambiguous]
    if ambiguous:
        return RelationCheck.UNCERTAIN, (f"{note}; uncertain: the box of {' and of '.join(ambiguous)} holds two depth "
                                         "surfaces of similar share, so which one is the object is a guess")
    if abs(difference) <= allowed:
        return RelationCheck.UNCERTAIN, note
    agrees = (difference < 0) == (predicate.sign < 0)
    return (RelationCheck.CONSISTENT if agrees else RelationCheck.CONTRADICTED), note
