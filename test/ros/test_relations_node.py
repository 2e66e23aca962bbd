"""The real node on the bundled sample scene (streamed with its depth): each relation's check, the status message
naming the contradicted one, markers and debug image coloured by verdict, and check_relations / relation_margin
applied to the next request."""

import numpy as np
import pytest
import sample_relations
from node_requests import CALL

from spatialthinker_ros.core.relations import VERDICT_COLOURS
from spatialthinker_ros.core.types import RelationCheck
from spatialthinker_ros.demo import load_sample, sample_camera as stream_sample
from spatialthinker_ros.testing.node_client import NodeClient, spin_until
from spatialthinker_ros.testing.processes import node_command
from spatialthinker_ros.msg import SceneRelation

pytestmark = pytest.mark.timeout(240)
CHECKS = {name: getattr(SceneRelation, f"CHECK_{name}") for name in RelationCheck.__members__}


@pytest.fixture
def sample_camera(ros_context):
    sample = load_sample()
    camera = stream_sample(ros_context, sample)
    yield sample
    camera.close()


def ask(client: NodeClient, proc):
    response = client.ask_until_ready(proc, with_depth=True, question=sample_relations.QUESTION,
                                      options=sample_relations.OPTIONS)
    assert response.success, response.message
    return response.answer


def test_the_node_checks_every_relation_of_an_answer_about_the_sample_scene(spawn, client, sample_camera, tmp_path):
    replay_file = sample_relations.write_replay(tmp_path / "relations.jsonl")
    proc = spawn(node_command(backend="replay", replay_file=str(replay_file), max_image_age=0.0), name="node")
    answer = ask(client, proc)
    graph = answer.scene_graph
    assert all(o.has_position for o in graph.objects)
    # each surface's depth spread (sensor-free sample: the objects' own relief), none of them a coin toss; the table,
    # a plane seen obliquely, is one surface from its front edge to the wall (a few dm of relief)
    assert all(0 < o.depth_spread < (0.3 if o.id == "table.1" else 0.1) and not o.depth_ambiguous
               for o in graph.objects)
    assert [(r.subject, r.predicate, r.object) for r in graph.relations] == sample_relations.TRIPLES
    assert [r.check for r in graph.relations] == [CHECKS[v] for v in sample_relations.EXPECTED]
    assert all(r.check_note for r in graph.relations)
    contradicted = graph.relations[1]
    positions = {o.id: o.position for o in graph.objects}
    stated = sample_relations.stated_positions(contradicted.check_note, "book.1", "z", "plate.1")
    assert stated == pytest.approx((positions["book.1"].z, positions["plate.1"].z), abs=0.005)
    stated = sample_relations.stated_positions(graph.relations[0].check_note, "mug.1", "x", "plate.1")
    assert stated == pytest.approx((positions["mug.1"].x, positions["plate.1"].x), abs=0.005)
    # the model's answer is untouched; the status message names the contradiction
    assert (answer.answer, answer.choice, answer.status) == ("(A) left of", "A", answer.STATUS_COMPLETE)
    assert answer.status_message == f"depth contradicts book.1 in front of plate.1: {contradicted.check_note}"

    # markers: each relation's arrow and label in its verdict's colour; the label says why
    assert spin_until(client.node, lambda: client.markers, CALL)
    markers = client.markers[-1].markers
    arrows = {m.id: m for m in markers if m.ns == "relations"}
    labels = {m.id: m for m in markers if m.ns == "relation_labels"}
    assert sorted(arrows) == sorted(labels) == list(range(len(sample_relations.TRIPLES)))
    for j, verdict in enumerate(sample_relations.EXPECTED):
        rgb = tuple(round(c * 255) for c in (arrows[j].color.r, arrows[j].color.g, arrows[j].color.b))
        assert rgb == VERDICT_COLOURS[RelationCheck[verdict]], (j, verdict)
    assert labels[1].text == f"in front of (contradicted: {contradicted.check_note})"
    assert labels[0].text == "left of (consistent)"

    # the debug image draws the contradicted arrow in red where the original has none of that colour
    assert spin_until(client.node, lambda: client.node.count_publishers("/spatialthinker/debug_image") > 0, CALL)
    ask(client, proc)
    assert spin_until(client.node, lambda: client.debug, CALL)
    drawn = np.frombuffer(client.debug[-1].data, np.uint8).reshape(480, 640, 3)
    red = np.all(drawn == VERDICT_COLOURS[RelationCheck.CONTRADICTED], axis=2)
    assert red.sum() > 100 and not np.all(sample_camera.rgb == VERDICT_COLOURS[RelationCheck.CONTRADICTED],
                                          axis=2).any()

    # check_relations and relation_margin apply to the next request
    client.set_parameters(relation_margin=0.5)
    assert [r.check for r in ask(client, proc).scene_graph.relations][:3] == [CHECKS["UNCERTAIN"]] * 3
    client.set_parameters(check_relations=False)
    answer = ask(client, proc)
    assert {(r.check, r.check_note) for r in answer.scene_graph.relations} == {
        (SceneRelation.CHECK_NOT_CHECKED, "relation checks are off (check_relations)")}
    assert answer.status_message == ""
    assert proc.alive()
