"""Relations checked against the 3D positions: vocabulary, margin rule, verdicts, and the pipeline's use of them."""

from dataclasses import replace

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_profiles import examples

from sample_relations import DATA, EXPECTED, META, MODEL_BOXES, SAMPLE_ANSWER, answer_about, stated_positions

from spatialthinker_ros.core.annotate import AMBIGUOUS_MARK, draw_scene, object_label
from spatialthinker_ros.core.depth_layers import DEPTH_NOISE_PER_M, depth_noise
from spatialthinker_ros.core.geometry import CameraIntrinsics, DepthImage
from spatialthinker_ros.core.pipeline import PipelineConfig, answer_dict, finish_result, prepare_request
from spatialthinker_ros.core.relations import (VERDICT_COLOURS, RelationCheckConfig, check_scene, checked_predicate,
                                               contradictions, margin, normalise_predicate, verdict_label)
from spatialthinker_ros.core.types import (AnswerStatus, Box, InferenceResult, Position3D, RelationCheck,
                                           SceneGraph, SceneObject, SceneRelation)

C = RelationCheck
CAM = META["camera"]
SAMPLE_K = CameraIntrinsics(CAM["fx"], CAM["fy"], CAM["cx"], CAM["cy"], CAM["width"], CAM["height"])
NO_NOISE = RelationCheckConfig(margin_m=0.02, extent_fraction=0.25, depth_noise_per_m=0.0)


def located(obj_id: str, x: float, z: float, size_x: float = 0.1, size_z: float = 0.1, y: float = 0.0) -> SceneObject:
    return SceneObject(obj_id, obj_id.split(".")[0], Box(0, 0, 1, 1), Position3D(x, y, z, size_x, 0.1, size_z))


def verdicts(objects, relations, config=RelationCheckConfig(), has_depth=True):
    scene = SceneGraph(tuple(objects), tuple(SceneRelation(*r) for r in relations), (640, 480))
    return check_scene(scene, config, has_depth).relations


# ---- the vocabulary --------------------------------------------------------------------------------------

@pytest.mark.parametrize("written, meaning", [
    ("left of", "left of"), ("To_The-Left  Of", "left of"), ("is located on the left side of", "left of"),
    ("left", "left of"), ("right_of", "right of"), ("on the right of.", "right of"),
    ("in front of", "in front of"), ("closer to the camera than", "in front of"), ("nearer than", "in front of"),
    ("BEHIND", "behind"), ("in back of", "behind"), ("further_from_the_camera_than", "behind"),
    ("farther than", "behind"),
])
def test_the_model_s_ways_of_writing_a_checked_predicate(written, meaning):
    assert checked_predicate(written).meaning == meaning


@pytest.mark.parametrize("written", ["on top of", "above", "under", "below", "On_Top_Of", "beneath", "on"])
def test_vertical_relations_are_not_checked_because_the_camera_does_not_know_gravity(written):
    objects = [located("mug.1", -0.2, 1.0), located("table.1", 0.3, 1.0)]
    [relation] = verdicts(objects, [("mug.1", written, "table.1")])
    assert relation.check is C.NOT_CHECKED
    assert relation.check_note == "vertical relation: the camera frame does not know which way gravity points"


def test_closer_to_another_object_is_not_a_depth_ordering():
    """The training data's distance questions use "closer to the X" for nearness to a referent object."""
    objects = [located("ball.1", 0.0, 1.0), located("cat.1", 0.0, 3.0)]
    [relation] = verdicts(objects, [("ball.1", "closer to", "cat.1")])
    assert relation.check is C.NOT_CHECKED
    assert relation.check_note == "'closer to' compares distances to cat.1, not to the camera: two positions cannot decide it"
    [relation] = verdicts(objects, [("ball.1", "closer to the camera than", "cat.1")])
    assert relation.check is C.CONSISTENT


def test_an_unknown_predicate_is_not_checked_and_says_why():
    objects = [located("mug.1", -0.2, 1.0), located("plate.1", 0.3, 1.0)]
    [relation] = verdicts(objects, [("mug.1", "Next_To", "plate.1")])
    assert (relation.check, relation.check_note) == (C.NOT_CHECKED, "'next to' is not in the checked vocabulary")
    assert normalise_predicate("  is   Next_To. ") == "next to"


# ---- verdicts and the margin rule ---------------------------------------------------------------------------

def test_true_false_and_borderline_lateral_relations_with_the_measured_quantities():
    mug, plate = located("mug.1", -0.21, 1.0, size_x=0.12), located("plate.1", 0.08, 1.0, size_x=0.12)
    true, false = verdicts([mug, plate], [("mug.1", "left of", "plate.1"), ("mug.1", "right of", "plate.1")],
                           NO_NOISE)
    # margin 0.02 + 0.25 * (0.06 + 0.06) = 0.05 m; difference 0.29 m
    assert true.check is C.CONSISTENT
    assert true.check_note == "mug.1 x=-0.21 m, plate.1 x=+0.08 m (difference 0.29 m, margin 0.05 m)"
    assert false.check is C.CONTRADICTED and false.check_note == true.check_note
    near = located("plate.1", -0.21 + 0.049, 1.0, size_x=0.12)          # 1 mm inside the margin
    [borderline] = verdicts([mug, near], [("mug.1", "right of", "plate.1")], NO_NOISE)
    assert borderline.check is C.UNCERTAIN
    beyond = located("plate.1", -0.21 + 0.051, 1.0, size_x=0.12)        # 1 mm beyond it
    [decided] = verdicts([mug, beyond], [("mug.1", "right of", "plate.1")], NO_NOISE)
    assert decided.check is C.CONTRADICTED


def test_true_false_and_borderline_depth_relations():
    cup, bowl = located("cup.1", 0.0, 0.80, size_z=0.08), located("bowl.1", 0.1, 1.20, size_z=0.16)
    relations = [("cup.1", "in front of", "bowl.1"), ("cup.1", "behind", "bowl.1"),
                 ("bowl.1", "farther from the camera than", "cup.1")]
    front, behind, farther = verdicts([cup, bowl], relations, NO_NOISE)   # margin 0.02 + 0.25 * (0.04 + 0.08)
    assert (front.check, behind.check, farther.check) == (C.CONSISTENT, C.CONTRADICTED, C.CONSISTENT)
    assert front.check_note == "cup.1 z=0.80 m, bowl.1 z=1.20 m (difference 0.40 m, margin 0.05 m)"
    close = located("bowl.1", 0.1, 0.83, size_z=0.16)      # 3 cm behind the cup: inside the 0.05 m margin
    [borderline] = verdicts([cup, close], [("cup.1", "behind", "bowl.1")], NO_NOISE)
    assert borderline.check is C.UNCERTAIN


def test_the_margin_grows_with_range_and_with_the_objects_extent():
    config = RelationCheckConfig()
    near = margin("z", Position3D(0, 0, 1.0, 0, 0, 0), Position3D(0, 0, 1.0, 0, 0, 0), config)
    far = margin("z", Position3D(0, 0, 4.0, 0, 0, 0), Position3D(0, 0, 4.0, 0, 0, 0), config)
    assert near == pytest.approx(0.02 + 0.005 * 2)
    assert far == pytest.approx(0.02 + 0.005 * 32)
    # the same 0.12 m lateral gap: decided at 1 m, uncertain at 4 m where depth noise moves x more
    gap = [("a.1", "left of", "b.1")]
    assert verdicts([located("a.1", 2.0, 1.0), located("b.1", 2.12, 1.0)], gap)[0].check is C.CONSISTENT
    assert verdicts([located("a.1", 2.0, 4.0), located("b.1", 2.12, 4.0)], gap)[0].check is C.UNCERTAIN
    # loose boxes: wide objects need a larger gap
    wide = [located("a.1", 0.0, 1.0, size_x=0.6), located("b.1", 0.12, 1.0, size_x=0.6)]
    assert verdicts(wide, gap)[0].check is C.UNCERTAIN
    assert verdicts(wide, gap, replace(NO_NOISE, margin_m=0.0, extent_fraction=0.0))[0].check is C.CONSISTENT


def test_without_depth_or_without_a_position_nothing_is_guessed():
    mug, plate = located("mug.1", -0.21, 1.0), located("plate.1", 0.08, 1.0)
    [no_depth] = verdicts([replace(mug, position=None), replace(plate, position=None)],
                          [("mug.1", "left of", "plate.1")], has_depth=False)
    assert (no_depth.check, no_depth.check_note) == (C.NOT_CHECKED, "no depth with this frame: no 3D positions")
    [one_missing] = verdicts([mug, replace(plate, position=None)], [("mug.1", "left of", "plate.1")])
    assert one_missing.check is C.NOT_CHECKED
    assert one_missing.check_note == "no 3D position for plate.1 (too little valid depth)"


def test_checks_turned_off_leave_every_relation_not_checked_and_in_place():
    objects = [located("mug.1", -0.21, 1.0), located("plate.1", 0.08, 1.0)]
    relations = [("mug.1", "right of", "plate.1"), ("mug.1", "on", "plate.1"), ("plate.1", "left", "mug.1")]
    checked = verdicts(objects, relations, RelationCheckConfig(enabled=False))
    assert [(r.subject, r.predicate, r.object) for r in checked] == relations
    assert {(r.check, r.check_note) for r in checked} == {(C.NOT_CHECKED, "relation checks are off (check_relations)")}


@pytest.mark.parametrize("settings_, message", [
    (dict(margin_m=-0.01), "relation margin"), (dict(margin_m=float("nan")), "relation margin"),
    (dict(extent_fraction=1.5), "extent_fraction"), (dict(depth_noise_per_m=-1.0), "depth_noise_per_m"),
])
def test_invalid_settings_are_refused(settings_, message):
    with pytest.raises(ValueError, match=message):
        RelationCheckConfig(**settings_)


def test_the_depth_spread_of_each_surface_widens_the_margin_on_both_axes():
    spread = [replace(o, position=replace(o.position, depth_spread=0.05))
              for o in (located("cup.1", 0.4, 1.0, size_z=0.0), located("bowl.1", 0.55, 1.1, size_z=0.0))]
    plain = [located("cup.1", 0.4, 1.0, size_z=0.0), located("bowl.1", 0.55, 1.1, size_z=0.0)]
    relations = [("cup.1", "in front of", "bowl.1"), ("cup.1", "left of", "bowl.1")]
    assert [r.check for r in verdicts(plain, relations, NO_NOISE)] == [C.CONSISTENT, C.CONSISTENT]
    # z: 0.10 m apart against 0.02 + 0.05 + 0.05 = 0.12 m; x: 0.02 + 0.25 * 0.1 + 0.05 * (0.4 / 1.0 + 0.55 / 1.1)
    front, left = verdicts(spread, relations, NO_NOISE)
    assert front.check is C.UNCERTAIN and "margin 0.12 m" in front.check_note
    assert margin("x", spread[0].position, spread[1].position, NO_NOISE) == pytest.approx(
        0.02 + 0.25 * 0.1 + 0.05 * (0.4 / 1.0 + 0.55 / 1.1))
    assert left.check is C.CONSISTENT       # 0.15 m apart against a 0.09 m margin


def test_the_noise_model_is_the_lifts():
    """One rule for depth noise: the margin's noise term is depth_layers.depth_noise at the configured constant."""
    config = RelationCheckConfig(margin_m=0.0, extent_fraction=0.0)
    here = Position3D(0.3, 0, 2.0, 0, 0, 0)
    assert config.depth_noise_per_m == DEPTH_NOISE_PER_M
    assert margin("z", here, here, config) == pytest.approx(2 * depth_noise(2.0))
    assert margin("x", here, here, config) == pytest.approx(2 * depth_noise(2.0) * 0.3 / 2.0)


def test_relations_of_an_ambiguous_object_are_uncertain_with_the_reason():
    cup = located("cup.1", -0.5, 1.0)
    bowl = replace(located("bowl.1", 0.5, 2.0), position=replace(located("bowl.1", 0.5, 2.0).position,
                                                                 ambiguous=True))
    plate = located("plate.1", 0.6, 2.0)
    left, front, other = verdicts([cup, bowl, plate], [("cup.1", "left of", "bowl.1"),
                                                        ("cup.1", "in front of", "bowl.1"),
                                                        ("cup.1", "left of", "plate.1")])
    for relation in (left, front):          # a metre apart, and still no verdict: which surface is the bowl?
        assert relation.check is C.UNCERTAIN
        assert relation.check_note.startswith("cup.1 ")
        assert "the box of bowl.1 holds two depth surfaces of similar share" in relation.check_note
    assert other.check is C.CONSISTENT


def test_an_ambiguous_lift_through_the_pipeline_makes_its_relations_uncertain():
    """A mug half hidden by a nearer thing over the left 45 % of its box, and a plate clearly right of it."""
    rgb = np.zeros((480, 640, 3), np.uint8)
    depth = np.full((480, 640), 3.0, np.float32)
    depth[100:200, 100:200] = 1.5
    depth[:, 100:145] = 0.8
    depth[100:200, 400:500] = 1.5
    text = answer_about({"mug.1": [100, 100, 200, 200], "plate.1": [400, 100, 500, 200]},
                        [("mug.1", "left of", "plate.1")])
    request = prepare_request(rgb, "Where is the mug?", ["left of", "right of"])
    result = finish_result(request, InferenceResult(text=text), ["left of", "right of"], (640, 480),
                           depth=DepthImage.from_metres(depth), intrinsics=SAMPLE_K)
    mug = result.scene.objects[0].position
    assert mug.ambiguous and mug.z == pytest.approx(1.5)
    assert result.scene.relations[0].check is C.UNCERTAIN
    assert "mug.1 holds two depth surfaces" in result.scene.relations[0].check_note
    as_json = answer_dict(result.parsed, result.inference, "Where is the mug?", ["left of", "right of"])["objects"]
    assert [(o["depth_ambiguous"], o["depth_spread_m"]) for o in as_json] == [(True, 0.0), (False, 0.0)]


# ---- property: mirroring the scene ---------------------------------------------------------------------------

PREDICATES = ["left of", "right of", "to the left of", "in front of", "behind", "on top of", "next to"]


@st.composite
def scenes(draw):
    count = draw(st.integers(2, 6))
    objects = []
    for i in range(count):
        position = None
        if draw(st.booleans()) or i < 2:
            position = Position3D(
                x=draw(st.floats(-3, 3)), y=draw(st.floats(-2, 2)), z=draw(st.floats(0.2, 8)),
                size_x=draw(st.floats(0, 2)), size_y=draw(st.floats(0, 2)), size_z=draw(st.floats(0, 2)))
        objects.append(SceneObject(f"thing.{i}", "thing", Box(0, 0, 1, 1), position))
    ids = st.sampled_from([o.id for o in objects])
    relations = draw(st.lists(st.tuples(ids, st.sampled_from(PREDICATES), ids).map(lambda r: SceneRelation(*r)),
                              min_size=1, max_size=12))
    return SceneGraph(tuple(objects), tuple(relations), (640, 480))


def mirrored(scene: SceneGraph) -> SceneGraph:
    objects = tuple(o if o.position is None else replace(o, position=replace(o.position, x=-o.position.x))
                    for o in scene.objects)
    return replace(scene, objects=objects)


SWAPPED = {C.CONSISTENT: C.CONTRADICTED, C.CONTRADICTED: C.CONSISTENT, C.UNCERTAIN: C.UNCERTAIN,
           C.NOT_CHECKED: C.NOT_CHECKED}


@settings(max_examples=examples(300))
@given(scenes())
def test_mirroring_left_right_swaps_consistent_and_contradicted_and_never_touches_uncertain(scene):
    before, after = check_scene(scene).relations, check_scene(mirrored(scene)).relations
    assert len(before) == len(after) == len(scene.relations)
    for b, a in zip(before, after):
        predicate = checked_predicate(b.predicate)
        lateral = predicate is not None and predicate.axis == "x"
        assert a.check is (SWAPPED[b.check] if lateral else b.check), (b, a)


def sample_inputs():
    rgb = cv2.cvtColor(cv2.imread(str(DATA / META["image"])), cv2.COLOR_BGR2RGB)
    depth_mm = cv2.imread(str(DATA / META["depth"]), cv2.IMREAD_UNCHANGED)
    return rgb, depth_mm


def finish(rgb, depth_mm, text, config=PipelineConfig(), with_depth=True):
    request = prepare_request(rgb, "Where is the mug relative to the plate?", ["left of", "right of"], config)
    depth = DepthImage.from_sensor(depth_mm, "16UC1") if with_depth else None
    result = InferenceResult(text=text, option_probabilities=(0.9, 0.1))   # none would be named in the problems
    return finish_result(request, result, ["left of", "right of"], (rgb.shape[1], rgb.shape[0]),
                         depth=depth, intrinsics=SAMPLE_K if with_depth else None, config=config)


box = st.tuples(st.integers(0, 600), st.integers(0, 440), st.integers(8, 200), st.integers(8, 200)).map(
    lambda b: [b[0], b[1], min(640, b[0] + b[2]), min(480, b[1] + b[3])])


@settings(max_examples=examples(60))
@given(st.lists(box, min_size=2, max_size=4))
def test_mirroring_the_image_and_depth_swaps_every_left_of_verdict(boxes):
    """The whole path: boxes lifted from the sample's depth, then the image, depth and boxes flipped left-right."""
    rgb, depth_mm = sample_inputs()
    ids = [f"thing.{i}" for i in range(len(boxes))]
    relations = [(a, "left of", b) for a in ids for b in ids if a != b]
    flipped_boxes = {i: [640 - b[2], b[1], 640 - b[0], b[3]] for i, b in zip(ids, boxes)}
    before = finish(rgb, depth_mm, answer_about(dict(zip(ids, boxes)), relations)).scene.relations
    after = finish(rgb[:, ::-1], np.ascontiguousarray(depth_mm[:, ::-1]),
                   answer_about(flipped_boxes, relations)).scene.relations   # cx 319.5 is the image's centre line
    assert [SWAPPED[b.check] for b in before] == [a.check for a in after]


# ---- through the pipeline, on the bundled sample scene (known object positions) -----------------------------

def test_the_sample_scene_gives_each_relation_its_verdict_and_names_the_contradiction():
    rgb, depth_mm = sample_inputs()
    result = finish(rgb, depth_mm, SAMPLE_ANSWER)
    assert [r.check.name for r in result.scene.relations] == EXPECTED
    contradicted = result.scene.relations[1]
    positions = {o.id: o.position for o in result.scene.objects}
    stated = stated_positions(contradicted.check_note, "book.1", "z", "plate.1")
    assert stated == pytest.approx((positions["book.1"].z, positions["plate.1"].z), abs=0.005)
    # the answer is untouched; the status still says how complete the output was; the message names it
    assert (result.parsed.answer, result.parsed.choice, result.parsed.status) == ("(A) left of", "A",
                                                                                   AnswerStatus.COMPLETE)
    assert result.parsed.status_message == f"depth contradicts book.1 in front of plate.1: {contradicted.check_note}"
    assert contradictions(result.scene) == [result.parsed.status_message]


def test_the_same_relation_with_and_without_depth_and_with_a_box_without_valid_depth():
    rgb, depth_mm = sample_inputs()
    text = answer_about(MODEL_BOXES, [("mug.1", "left of", "plate.1")])
    [with_depth] = finish(rgb, depth_mm, text).scene.relations
    [without] = finish(rgb, depth_mm, text, with_depth=False).scene.relations
    assert with_depth.check is C.CONSISTENT
    assert (without.check, without.check_note) == (C.NOT_CHECKED, "no depth with this frame: no 3D positions")
    holed = depth_mm.copy()
    x1, y1, x2, y2 = MODEL_BOXES["plate.1"]
    holed[y1:y2, x1:x2] = 0                   # the sensor saw nothing there
    result = finish(rgb, holed, text)
    [no_position] = result.scene.relations
    assert (no_position.check, no_position.check_note) == (
        C.NOT_CHECKED, "no 3D position for plate.1 (too little valid depth)")
    assert "depth invalid inside the box of plate.1" in result.parsed.status_message


def test_checks_off_in_the_pipeline_config():
    rgb, depth_mm = sample_inputs()
    config = PipelineConfig(relations=RelationCheckConfig(enabled=False))
    result = finish(rgb, depth_mm, SAMPLE_ANSWER, config)
    assert {r.check for r in result.scene.relations} == {C.NOT_CHECKED}
    assert result.parsed.status_message == ""


def test_a_larger_base_margin_turns_the_contradiction_uncertain():
    rgb, depth_mm = sample_inputs()
    config = PipelineConfig(relations=RelationCheckConfig(margin_m=0.5))
    relations = finish(rgb, depth_mm, SAMPLE_ANSWER, config).scene.relations
    assert [r.check for r in relations[:3]] == [C.UNCERTAIN] * 3


# ---- drawn distinctly ------------------------------------------------------------------------------------------

def test_the_debug_drawing_colours_relations_by_their_check_and_labels_the_reason():
    objects = (SceneObject("a.1", "a", Box(20, 20, 60, 60)), SceneObject("b.1", "b", Box(500, 20, 540, 60)))
    for check, colour in VERDICT_COLOURS.items():
        relation = SceneRelation("a.1", "left of", "b.1", check, "a.1 x=-0.50 m, b.1 x=+0.50 m")
        canvas = draw_scene(np.zeros((200, 640, 3), np.uint8), SceneGraph(objects, (relation,), (640, 200)))
        arrow = canvas[40, 70:270]               # between box a and the label, along the arrow
        assert (arrow == colour).all(), check
    contradicted = SceneRelation("a.1", "left of", "b.1", C.CONTRADICTED, "a.1 x=+0.30 m, b.1 x=-0.20 m")
    assert verdict_label(contradicted) == "left of (contradicted: a.1 x=+0.30 m, b.1 x=-0.20 m)"
    assert verdict_label(replace(contradicted, check=C.CONSISTENT)) == "left of (consistent)"
    assert verdict_label(replace(contradicted, check=C.NOT_CHECKED)) == "left of"


def test_an_ambiguous_position_is_drawn_dashed_and_marked():
    """Position3D.ambiguous: the box is dashed and the depth carries AMBIGUOUS_MARK; a sure position is solid."""
    sure = Position3D(0.0, 0.0, 1.5, 0.1, 0.1, 0.0)
    objects = (SceneObject("a.1", "a", Box(20, 20, 220, 120), sure),
               SceneObject("b.1", "b", Box(300, 20, 500, 120), replace(sure, ambiguous=True)))
    canvas = draw_scene(np.zeros((200, 640, 3), np.uint8), SceneGraph(objects, (), (640, 200)))
    drawn = canvas.any(axis=2)
    assert drawn[120, 30:210].all(), "a.1's bottom edge: solid"
    assert 0.3 < drawn[120, 310:490].mean() < 0.8, "b.1's bottom edge: dashes and gaps"
    assert [object_label(o) for o in objects] == ["a.1 1.50m", f"b.1 1.50m{AMBIGUOUS_MARK}"]
    assert object_label(replace(objects[0], position=None)) == "a.1"


def test_labels_near_the_right_edge_stay_inside_the_image():
    """As the demo's relation label "in front of (uncertain: ...)" did, labels at a box or arrow near the right
    edge must move in rather than run off: drawn on the image and on the same image widened to the right, the
    labels cover as many pixels."""
    objects = (SceneObject("plate.1", "plate", Box(20, 60, 100, 140)),
               SceneObject("bookshelf.12", "bookshelf", Box(200, 60, 239, 140)))
    relation = SceneRelation("plate.1", "in front of", "bookshelf.12", C.UNCERTAIN, "dz 0.09 m")
    scene = SceneGraph(objects, (relation,), (240, 200))

    def drawn(width: int) -> int:    # up to 480 pixels wide the text has the same size
        canvas = draw_scene(np.full((200, width, 3), 90, np.uint8), scene)
        return int((canvas != 90).any(axis=2).sum())

    inside, unbounded = drawn(240), drawn(480)
    assert inside >= 0.97 * unbounded, f"{unbounded - inside} label pixels fell off the right edge"
