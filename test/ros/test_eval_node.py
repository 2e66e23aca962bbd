"""A running node measured as deployed (spatialthinker-eval --node), and inline options filling `choice` in the
node's own answers."""

import dataclasses
import json
import subprocess

import pytest
from std_msgs.msg import Header

import eval_data
from eval_data import EXPECTED, ROWS
from spatialthinker_ros.core.conformal import CalibrationSetup
from spatialthinker_ros.testing.fake_cameras import pattern_image
from spatialthinker_ros.testing.node_client import NodeClient
from spatialthinker_ros.testing.processes import installed_executable, node_command
from spatialthinker_ros.ros.conversions import rgb_to_image_msg
from spatialthinker_ros.srv import AskSpatial

pytestmark = pytest.mark.timeout(240)

EVAL = installed_executable("spatialthinker-eval")
CARD = "Where is the cat relative to the couch? (A) on top of (B) in front of (C) behind (D) beside"
TRAINING = "Where is the cat relative to the couch?\nOptions: (A) on top of (B) in front of (C) behind (D) beside"


@pytest.fixture
def dataset(tmp_path):
    """The project JSONL (rows 1 and 5 with inline options) and a replay file that also answers CARD/TRAINING."""
    path, questions = eval_data.project_jsonl(tmp_path)
    replay = eval_data.write_replay(tmp_path / "replay.jsonl", questions)
    with replay.open("a") as out:
        out.write(json.dumps({"question": CARD, "response": eval_data.response("in front of the couch")}) + "\n")
        out.write(json.dumps({"question": TRAINING, "response": eval_data.response("(C)")}) + "\n")
    return path, replay


@pytest.fixture
def client(ros_context):
    c = NodeClient(ros_context, outputs=False)
    yield c
    c.close()


def test_inline_options_fill_choice_in_the_nodes_answers(spawn, client, dataset):
    _, replay = dataset
    proc = spawn(node_command(backend="replay", replay_file=str(replay)), name="node")
    image = rgb_to_image_msg(pattern_image(320, 240), Header(frame_id="test"))
    client.wait_for_service(proc)
    card = client.ask(question=CARD, image=image)
    assert card.success, (card.message, proc.output())
    assert card.answer.answer == "in front of the couch" and card.answer.choice == "B"
    training = client.ask(question=TRAINING, image=image)
    assert training.success and training.answer.choice == "C"
    # the same options inline and as the list are offered once; different ones are refused
    both = client.ask(question=CARD, options=["on top of", "in front of", "behind", "beside"], image=image)
    assert both.success and both.answer.choice == "B"
    clash = client.ask(question=CARD, options=["left", "right"], image=image)
    assert clash.error_code == AskSpatial.Response.ERROR_INVALID_REQUEST and "differ from the options" in clash.message
    assert proc.alive()


def test_eval_through_a_running_node(spawn, dataset, tmp_path):
    path, replay = dataset
    proc = spawn(node_command(backend="replay", replay_file=str(replay)), name="node")
    out = tmp_path / "out"
    done = subprocess.run([str(EVAL), "run", str(path), "--out", str(out), "--node", "spatialthinker",
                           "--concurrency", "3", "--no-progress"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, (done.stderr, proc.output())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "node" and summary["scored"] == 9 and summary["errors"] == 0
    assert summary["correct"] == EXPECTED["correct"] and summary["unmatched"] == EXPECTED["unmatched"]
    for category, (total, correct) in EXPECTED["categories"].items():
        assert (summary["categories"][category]["total"], summary["categories"][category]["correct"]) == (total, correct)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in sorted(rows, key=lambda r: int(r["index"][1:]))] == [row.correct for row in ROWS]
    assert all(r["output"].startswith("<observe>") and r["latency_s"] > 0 for r in rows)
    # the node's SpatialAnswers become the same rows as the same replay answered in-process
    local = tmp_path / "local"
    done = subprocess.run([str(EVAL), "run", str(path), "--out", str(local), "--backend", "replay", "--replay-file",
                           str(replay), "--no-progress"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    in_process = {r["index"]: r for r in map(json.loads, (local / "predictions.jsonl").read_text().splitlines())}
    fields = ("output", "parsed_answer", "choice", "status", "problems", "objects")
    assert any(r["objects"] and r["problems"] for r in rows), "the rows exercise objects and problems"
    assert [{k: r.get(k) for k in fields} for r in rows] == [{k: in_process[r["index"]].get(k) for k in fields}
                                                             for r in rows]
    # the node's own setup, read from its ~/stats, is what a calibration from the run holds for: the same as the
    # same replay in-process (the node's default max_input_pixels), and the run calibrates
    recorded = json.loads((out / "run.json").read_text())["calibration_setup"]
    assert recorded == dataclasses.asdict(CalibrationSetup.replay(1920 * 1080, "model_card"))
    assert recorded == json.loads((local / "run.json").read_text())["calibration_setup"]
    calibrated = subprocess.run([str(EVAL), "calibrate", str(out), "--coverage", "0.5", "--out",
                                 str(tmp_path / "calibration.json")], capture_output=True, text=True, timeout=120)
    assert calibrated.returncode == 0, calibrated.stderr


def test_eval_reports_a_node_that_is_not_there(tmp_path):
    path, _ = eval_data.project_jsonl(tmp_path)
    done = subprocess.run([str(EVAL), "run", str(path), "--out", str(tmp_path / "out"), "--node", "nobody",
                           "--timeout", "5"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3 and "no service /nobody/ask" in done.stderr


def test_eval_names_the_nodes_error_code_and_counts_a_failed_row_once(spawn, dataset, tmp_path):
    path, replay = dataset
    lines = replay.read_text().splitlines(keepends=True)
    first = json.loads(lines[0])["question"]
    replay.write_text("".join(lines[1:]))                 # the first row's question has no recorded answer
    proc = spawn(node_command(backend="replay", replay_file=str(replay)), name="node")
    out = tmp_path / "out"
    done = subprocess.run([str(EVAL), "run", str(path), "--out", str(out), "--node", "spatialthinker",
                           "--no-progress"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, (done.stderr, proc.output())
    [failed] = [r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines()) if r.get("error")]
    assert failed["question"].startswith(first[:40])
    assert "/spatialthinker/ask ERROR_BACKEND: " in failed["error"] and "error 6" not in failed["error"], failed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors"] == 1 and summary["failed_rows"] == [{"index": failed["index"], "reason": failed["error"]}]
    assert failed["index"] not in summary["unmatched_rows"], "a failed request is counted once, as failed"
    assert f"| {failed['index']} | /spatialthinker/ask ERROR_BACKEND: " in (out / "summary.md").read_text()
