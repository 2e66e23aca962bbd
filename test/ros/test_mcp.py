"""spatialthinker_mcp through the official MCP client over stdio, against a real node: the replay backend, the sample
scene streamed with depth by spatialthinker_camera, and a calibration file. Tools and schemas, the act-or-ask
decision, positions from depth, the annotated image, the node's error codes as tool errors, progress and
cancellation, concurrent calls, and a node that is inactive or gone."""

import asyncio
import base64
import contextlib
import json

import anyio
import cv2
import jsonschema
import numpy as np
import pytest
from node_requests import STARTUP

from spatialthinker_ros.core.conformal import Calibration, CalibrationSetup
from spatialthinker_ros.action import AskSpatial
from spatialthinker_ros.core.config import PARAMETERS
from spatialthinker_ros.mcp.node_link import NodeLink
from spatialthinker_ros.mcp.results import SCENE_QUESTION
from spatialthinker_ros.testing.mcp_client import mcp_client
from spatialthinker_ros.testing.node_client import NodeClient, new_context
from spatialthinker_ros.testing.processes import Processes, installed_executable, node_command
from eval_data import DATA, META

pytestmark = pytest.mark.timeout(240)

CALL_S = 60.0
HOLD_S = 300.0             # replay_latency: the longest a held generation lasts (only if a test fails before release)
[SAMPLE, CLOSEST] = META["questions"]
RESPONSES = {line["question"]: line["response"]
             for line in map(json.loads, (DATA / META["replay_file"]).read_text().splitlines())}
FREE = "What is on the table?"
HELD = "Is anything moving?"                       # its generation runs until the test releases it
QUIET_HELD = "Is anything falling?"                # the same, asked with no progress: the service, ~/cancel
LEFT_HELD = "Is anything rolling?"                 # the same, asked through a NodeLink that closes at once
LEFT_EARLY = "Is anything sliding?"                # the same, given up at its first feedback
SAMPLE_PROBABILITIES = [0.85, 0.05, 0.05, 0.05]     # threshold 0.6 keeps p >= 0.4: {A}, act
CLOSEST_PROBABILITIES = [0.34, 0.33, 0.33]          # none >= 0.4: the empty set, ask for help
MAX_INPUT_PIXELS = next(p.default for p in PARAMETERS if p.name == "max_input_pixels")
CAMERA = META["camera"]


def replay_lines(folder):
    """Every line's generation ends once its until_file exists: `released` exists from the start, the others are
    made by the tests that hold HELD's and QUIET_HELD's generations (still running when the tests cancel them);
    QUIET_HELD's generation says when it started."""
    released = folder / "released"
    lines = [
        {"question": SAMPLE["question"], "response": RESPONSES[SAMPLE["question"]],
         "option_probabilities": SAMPLE_PROBABILITIES},
        {"question": CLOSEST["question"], "response": RESPONSES[CLOSEST["question"]],
         "option_probabilities": CLOSEST_PROBABILITIES},
        {"question": FREE, "response": RESPONSES[SAMPLE["question"]].replace("(A) left of", "a mug, a plate, a book")},
        {"question": SCENE_QUESTION, "response": RESPONSES[SAMPLE["question"]]},
    ]
    return [{**line, "until_file": str(released)} for line in lines] + [
        {"question": HELD, "response": RESPONSES[SAMPLE["question"]], "until_file": str(folder / "held_released")},
        {"question": QUIET_HELD, "response": RESPONSES[SAMPLE["question"]],
         "until_file": str(folder / "quiet_released"), "started_file": str(folder / "quiet_started")},
        {"question": LEFT_HELD, "response": RESPONSES[SAMPLE["question"]], "until_file": str(folder / "left_released")},
        {"question": LEFT_EARLY, "response": RESPONSES[SAMPLE["question"]],
         "until_file": str(folder / "left_early_released")}]


def camera_command():
    return [str(installed_executable("spatialthinker_camera")), "--image", str(DATA / META["image"]),
            "--depth", str(DATA / META["depth"]), "--fx", str(CAMERA["fx"]), "--fy", str(CAMERA["fy"]),
            "--cx", str(CAMERA["cx"]), "--cy", str(CAMERA["cy"]), "--frame-id", CAMERA["frame_id"], "--rate", "10"]


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """The node (cameras: the streamed 'default' and an 'idle' one that never sends), the camera, and a ROS client
    of the node for its ~/stats."""
    folder = tmp_path_factory.mktemp("mcp")
    replay = folder / "replay.jsonl"
    (folder / "released").touch()
    replay.write_text("".join(json.dumps(line) + "\n" for line in replay_lines(folder)))
    calibration = folder / "calibration.json"
    Calibration(threshold=0.6, coverage=0.9, n=300,
                setup=CalibrationSetup.replay(MAX_INPUT_PIXELS, "model_card")).save(calibration)
    context = new_context()
    with Processes(folder) as processes:
        node = processes.start(node_command(backend="replay", replay_file=str(replay), max_image_age=0.0,
                                            calibration_file=str(calibration), cameras=["default", "idle"],
                                            replay_latency=HOLD_S), name="node")
        processes.start(camera_command(), name="camera")
        client = NodeClient(context, process=node, outputs=False)
        ready = client.ask_until_ready(node, timeout=STARTUP, with_depth=True, question=SAMPLE["question"],
                                       options=SAMPLE["options"])
        assert ready.success, ready.message
        yield client, folder, {o.id: o.position for o in ready.answer.scene_graph.objects}
        client.close()
    context.try_shutdown()


def run(scenario, folder, *args):
    """Runs `scenario(client)` against a fresh spatialthinker_mcp child."""
    async def main():
        async with mcp_client(folder / "mcp.log", *args) as client:
            return await scenario(client)
    return anyio.run(main)


def structured(result, tool):
    """The result's structured content, validated against the tool's published output schema."""
    assert not result.is_error, result.content[0].text
    jsonschema.validate(result.structured_content, tool.output_schema)
    return result.structured_content


def test_the_four_read_only_tools_are_listed_with_input_and_output_schemas(graph):
    async def scenario(client):
        return (await client.list_tools()).tools

    tools = {tool.name: tool for tool in run(scenario, graph[1])}
    assert set(tools) == {"ask_spatial", "describe_scene", "locate", "node_status"}
    for tool in tools.values():
        assert tool.annotations.read_only_hint is True and tool.annotations.destructive_hint is False
        assert tool.output_schema["type"] == "object" and tool.input_schema["type"] == "object"
    ask = tools["ask_spatial"].input_schema
    assert set(ask["properties"]) == {"question", "options", "camera", "include_image"}
    assert ask["required"] == ["question"]
    assert {"answer", "choice", "option_probabilities", "prediction_set", "coverage", "decision", "objects",
            "relations", "stamp", "camera", "model", "inference_time_s"} <= set(tools["ask_spatial"].output_schema[
                "properties"])
    assert set(tools["locate"].input_schema["properties"]) == {"object", "camera"}


def test_ask_spatial_gives_probabilities_the_calibrated_set_and_the_decision_with_a_decodable_image(graph):
    async def scenario(client):
        tool = {t.name: t for t in (await client.list_tools()).tools}["ask_spatial"]
        single = await client.call_tool("ask_spatial", {"question": SAMPLE["question"], "options": SAMPLE["options"],
                                                        "include_image": True}, CALL_S)
        empty = await client.call_tool("ask_spatial", {"question": CLOSEST["question"],
                                                       "options": CLOSEST["options"]}, CALL_S)
        free = await client.call_tool("ask_spatial", {"question": FREE}, CALL_S)
        return tool, single, empty, free

    tool, single, empty, free = run(scenario, graph[1])
    answer = structured(single, tool)
    assert (answer["answer"], answer["choice"], answer["decision"]) == ("(A) left of", "A", "act")
    assert (answer["prediction_set"], answer["coverage"]) == (["A"], pytest.approx(0.9))
    assert {letter: (p["option"], p["probability"]) for letter, p in answer["option_probabilities"].items()} == {
        letter: (option, pytest.approx(p, abs=1e-6))
        for letter, option, p in zip("ABCD", SAMPLE["options"], SAMPLE_PROBABILITIES)}
    assert (answer["camera"], answer["model"]) == ("default", "replay") and answer["stamp"] > 0
    assert answer["inference_time_s"] >= 0
    mug = next(o for o in answer["objects"] if o["id"] == "mug.1")
    assert mug["frame_id"] == CAMERA["frame_id"] and mug["position"] is not None
    assert [r["check"] for r in answer["relations"]] and all(r["note"] for r in answer["relations"])
    assert single.content[0].text.startswith("answer: (A) left of (A); decision: act")
    [image] = [c for c in single.content if c.type == "image"]
    decoded = cv2.imdecode(np.frombuffer(base64.b64decode(image.data), np.uint8), cv2.IMREAD_COLOR)
    assert image.mime_type == "image/jpeg" and decoded.shape == (CAMERA["height"], CAMERA["width"], 3)

    nothing = structured(empty, tool)
    assert (nothing["prediction_set"], nothing["decision"]) == ([], "ask_for_help")
    assert [p["probability"] for p in nothing["option_probabilities"].values()] == pytest.approx(CLOSEST_PROBABILITIES)
    free_form = structured(free, tool)
    assert (free_form["decision"], free_form["option_probabilities"], free_form["coverage"]) == ("free_form", {}, 0)
    assert free_form["answer"] == "a mug, a plate, a book"


def test_describe_scene_and_locate_give_positions_from_depth(graph):
    async def scenario(client):
        tools = {t.name: t for t in (await client.list_tools()).tools}
        scene = await client.call_tool("describe_scene", {"include_image": True}, CALL_S)
        found = await client.call_tool("locate", {"object": "the red mug"}, CALL_S)
        missing = await client.call_tool("locate", {"object": "banana"}, CALL_S)
        return tools, scene, found, missing

    _, folder, by_service = graph
    tools, scene, found, missing = run(scenario, folder)
    objects = {o["id"]: o for o in structured(scene, tools["describe_scene"])["objects"]}
    assert set(objects) == {"mug.1", "plate.1", "book.1"}
    for name, obj in objects.items():   # the static scene's depth: what the node's service gives, near the truth
        position = [obj["position"][axis] for axis in "xyz"]
        assert position == pytest.approx([getattr(by_service[name], axis) for axis in "xyz"], abs=1e-6), name
        assert position == pytest.approx(META["objects"][name]["centre_m"], abs=0.05), name
    [image] = [c for c in scene.content if c.type == "image"]
    decoded = cv2.imdecode(np.frombuffer(base64.b64decode(image.data), np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (CAMERA["height"], CAMERA["width"], 3)
    [mug] = structured(found, tools["locate"])["matches"]
    assert (mug["id"], mug["match"]) == ("mug.1", "label")
    assert mug["position"]["z"] == pytest.approx(META["objects"]["mug.1"]["centre_m"][2], abs=0.03)
    assert found.content[0].text.startswith("1 match 'the red mug': mug.1 at z 0.")
    none = structured(missing, tools["locate"])
    assert none["matches"] == [] and none["reason"].startswith("no object matches 'banana'; the scene's objects: mug.1")


def test_node_error_codes_and_bad_arguments_arrive_as_tool_errors_with_their_names(graph):
    async def scenario(client):
        return [await client.call_tool("ask_spatial", arguments, CALL_S) for arguments in (
            {"question": SAMPLE["question"], "camera": "nope"},
            {"question": SAMPLE["question"], "camera": "idle"},
            {"question": SAMPLE["question"], "options": ["", "right of"]},
            {"options": ["left of"]},
        )] + [await client.call_tool("describe_scene", {"camera": "nope"}, CALL_S)]

    unknown, no_image, invalid, no_question, scene_unknown = run(scenario, graph[1])
    for result, name in ((unknown, "ERROR_UNKNOWN_CAMERA"), (no_image, "ERROR_NO_IMAGE"),
                         (invalid, "ERROR_INVALID_REQUEST"), (scene_unknown, "ERROR_UNKNOWN_CAMERA")):
        assert result.is_error and result.content[0].text.startswith(f"{name}: "), (name, result.content)
        assert result.structured_content is None
    assert "'nope'" in unknown.content[0].text
    assert no_question.is_error and "question" in no_question.content[0].text and "Field required" in \
        no_question.content[0].text


def test_progress_arrives_in_order_and_a_cancelled_call_cancels_its_goal(graph):
    client_of_node, folder, _ = graph
    cancelled_before = client_of_node.stats[-1]["scheduler"]["cancelled"]

    async def scenario(client):
        progress = []

        async def on_progress(value, total, message):
            progress.append((value, message))

        # a fresh server sees the node's action as ready from its own side of discovery; the node's feedback writer
        # may match it a moment later, so the first goal's first feedback can be missed: progress is best effort
        assert not (await client.call_tool("describe_scene", {}, CALL_S)).is_error
        result = await client.call_tool("ask_spatial", {"question": SAMPLE["question"],
                                                        "options": SAMPLE["options"]}, CALL_S, on_progress)
        generating = anyio.Event()

        async def on_held_progress(value, total, message):
            if message.startswith("generating"):
                generating.set()

        async with anyio.create_task_group() as group:
            group.start_soon(client.call_tool, "ask_spatial", {"question": HELD}, CALL_S, on_held_progress)
            with anyio.fail_after(CALL_S):
                await generating.wait()   # the node is generating its answer, held until released
            group.cancel_scope.cancel()
        return result, progress

    result, progress = run(scenario, folder)
    assert not result.is_error
    values, messages = [v for v, _ in progress], [m for _, m in progress]
    assert values == sorted(set(values)) and values[0] == 1, progress
    stages = [m.split(":")[0] for m in messages]
    assert stages[0] == "queued" and "generating" in stages and stages[-1] == "scene ready", progress
    order = {"queued": 0, "generating": 1, "scene ready": 2}
    assert [order[s] for s in stages] == sorted(order[s] for s in stages), progress
    try:
        client_of_node.wait(lambda: client_of_node.stats[-1]["scheduler"]["cancelled"] > cancelled_before, CALL_S,
                            "the node's ~/stats to count the cancelled goal")
    finally:
        (folder / "held_released").touch()   # the held generation ends; the backend answers the next tests


@pytest.mark.parametrize("question, give_up_at, release", [(LEFT_HELD, "generating", "left_released"),
                                                            (LEFT_EARLY, "first feedback", "left_early_released")],
                         ids=["generating", "first-feedback"])
def test_a_goal_cancelled_as_its_server_exits_is_cancelled_on_the_node(graph, question, give_up_at, release):
    """A client that cancels a call and leaves at once: the server closes its NodeLink straight after the cancel,
    and the goal's cancel must still reach the node (close lets it), or the node answers nobody. The goal's
    feedback can arrive before its acceptance does (they travel on different topics): given up then, the goal is
    cancelled only once it is accepted, and close waits for that too."""
    client_of_node, folder, _ = graph
    cancelled_before = client_of_node.stats[-1]["scheduler"]["cancelled"]
    link = NodeLink(wait_s=CALL_S)

    async def ask_and_give_up():
        generating = asyncio.Event()

        def on_progress(progress):
            if give_up_at == "first feedback" or progress.stage == AskSpatial.Feedback.STAGE_GENERATING:
                generating.set()

        asking = asyncio.ensure_future(link.ask_with_feedback(CALL_S, on_progress, question=question))
        await asyncio.wait_for(generating.wait(), CALL_S)   # the node has the goal, held until released
        asking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asking

    try:
        asyncio.run(ask_and_give_up())
    finally:
        link.close()
    try:
        client_of_node.wait(lambda: client_of_node.stats[-1]["scheduler"]["cancelled"] > cancelled_before, CALL_S,
                            "the node's ~/stats to count the goal cancelled as its link closed")
    finally:
        (folder / release).touch()


def test_a_call_without_progress_is_asked_by_service_and_cancelled_with_its_request_id(graph):
    """No progress token: the server calls ~/ask (one round trip) under a request_id of its own, and a cancelled
    call cancels that request with ~/cancel; the node's ~/stats count it. The generation is held, and says when it
    started, so the cancel reaches a request the node is working on however slow the machine."""
    client_of_node, folder, _ = graph
    cancelled_before = client_of_node.stats[-1]["scheduler"]["cancelled"]

    async def scenario(client):
        async with anyio.create_task_group() as group:
            group.start_soon(client.call_tool, "ask_spatial", {"question": QUIET_HELD}, CALL_S)
            with anyio.fail_after(CALL_S):
                while not (folder / "quiet_started").exists():
                    await anyio.sleep(0.02)
            group.cancel_scope.cancel()

    try:
        run(scenario, folder)
        client_of_node.wait(lambda: client_of_node.stats[-1]["scheduler"]["cancelled"] > cancelled_before, CALL_S,
                            "the node's ~/stats to count the call cancelled through ~/cancel")
    finally:
        (folder / "quiet_released").touch()


def test_four_concurrent_calls_are_each_answered_once(graph):
    client_of_node, folder, _ = graph
    questions = [(SAMPLE, "act"), (CLOSEST, "ask_for_help"), (SAMPLE, "act"), (CLOSEST, "ask_for_help")]
    completed_before = client_of_node.stats[-1]["scheduler"]["completed"]

    async def scenario(client):
        return await asyncio.gather(*(client.call_tool("ask_spatial", {"question": q["question"],
                                                                       "options": q["options"]}, CALL_S)
                                      for q, _ in questions))

    answers = run(scenario, folder)
    assert [(a.is_error, a.structured_content["decision"]) for a in answers] == [(False, d) for _, d in questions]
    client_of_node.wait(lambda: client_of_node.stats[-1]["scheduler"]["completed"] >= completed_before + 4, CALL_S,
                        "the node's ~/stats to count the four answers")
    assert client_of_node.stats[-1]["scheduler"]["completed"] == completed_before + 4, "each answered once"


def test_node_status_reports_state_backend_cameras_calibration_and_queue(graph):
    async def scenario(client):
        tool = {t.name: t for t in (await client.list_tools()).tools}["node_status"]
        status = structured(await client.call_tool("node_status", {}, CALL_S), tool)
        # a fresh server has only just subscribed to the cameras: ask until it has seen a frame
        with anyio.fail_after(CALL_S):
            while status["cameras"][0]["last_frame_age_s"] is None:
                await anyio.sleep(0.1)
                status = structured(await client.call_tool("node_status", {}, CALL_S), tool)
        return status

    status = run(scenario, graph[1])
    assert (status["node"], status["lifecycle_state"], status["backend"], status["model"]) == (
        "/spatialthinker", "active", "replay", "replay")
    default, idle = status["cameras"]
    assert (default["name"], default["topic"], idle["name"], idle["topic"]) == ("default", "/image", "idle",
                                                                                "/idle/image")
    assert 0 <= default["last_frame_age_s"] < 30 and default["frames_received"] > 0
    assert (idle["last_frame_age_s"], idle["frames_received"]) == (None, 0)
    calibration = status["calibration"]
    assert (calibration["coverage"], calibration["threshold"], calibration["rows"]) == (0.9, 0.6, 300)
    assert calibration["setup"]["backend"] == "replay"
    assert status["queue"]["queue_size"] == 8 and status["queue"]["completed"] >= 1


def test_an_inactive_node_and_a_stopped_one_give_errors_not_hangs(tmp_path, spawn):
    """A node of its own, named by the options (the module's node runs on the same graph)."""
    node = spawn(node_command("-r", "__ns:=/lab", "-r", "__node:=eyes", backend="replay",
                              replay_file=str(tmp_path / "none.jsonl"), autostart=False), name="node")

    async def scenario(client):
        with anyio.fail_after(STARTUP):      # the node's services appear
            while (status := await client.call_tool("node_status", {}, CALL_S)).is_error:
                await anyio.sleep(0.1)
        inactive = await client.call_tool("ask_spatial", {"question": "Where is it?"}, CALL_S)
        node.stop()
        with anyio.fail_after(30):     # --wait 2: each call gives up two seconds after the node is gone
            gone = await client.call_tool("ask_spatial", {"question": "Where is it?"}, CALL_S)
            gone_status = await client.call_tool("node_status", {}, CALL_S)
        return status, inactive, gone, gone_status

    status, inactive, gone, gone_status = run(scenario, tmp_path, "--wait", "2", "--namespace", "lab",
                                              "--node-name", "eyes")
    assert (status.structured_content["node"], status.structured_content["lifecycle_state"]) == ("/lab/eyes",
                                                                                                 "unconfigured")
    assert inactive.is_error and inactive.content[0].text.startswith("ERROR_NOT_ACTIVE: ")
    for result in (gone, gone_status):
        assert result.is_error and result.content[0].text.startswith(
            "NODE_UNAVAILABLE: the node /lab/eyes is not running"), result.content
