"""spatialthinker-ask as installed, run as a user runs it: a subprocess on files, JSON on stdout, one-line errors."""

import json
import math
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import sample_relations
from spatialthinker_ros.testing.processes import free_port, installed_executable

import spatialthinker_ros

pytestmark = pytest.mark.timeout(180)

ASK = installed_executable("spatialthinker-ask")
DATA = Path(spatialthinker_ros.__file__).parent / "data"     # the installed package's copy
META = json.loads((DATA / "sample_scene.json").read_text())
IMAGE, DEPTH, REPLAY = DATA / META["image"], DATA / META["depth"], DATA / META["replay_file"]
CAMERA = META["camera"]
INTRINSICS = ["--fx", CAMERA["fx"], "--fy", CAMERA["fy"], "--cx", CAMERA["cx"], "--cy", CAMERA["cy"]]
WHERE, CLOSEST = META["questions"]


def ask(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(ASK), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def answered(*args, **kwargs) -> dict:
    done = ask(*args, **kwargs)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def replay(question: dict, *args) -> dict:
    return answered("--backend", "replay", "--replay-file", REPLAY, "--image", IMAGE,
                    "--question", question["question"], "--options", *question["options"], *args)


def test_sample_data_is_installed_small_and_consistent():
    rgb = cv2.imread(str(IMAGE), cv2.IMREAD_UNCHANGED)
    depth = cv2.imread(str(DEPTH), cv2.IMREAD_UNCHANGED)
    assert rgb.shape == (480, 640, 3) and rgb.dtype == np.uint8
    assert depth.shape == (480, 640) and depth.dtype == np.uint16
    for path in (IMAGE, DEPTH, REPLAY):
        assert path.stat().st_size < 200_000
    # every object's depth, in millimetres, agrees with where the scene says it stands
    for name in ("mug.1", "plate.1", "book.1"):
        x1, y1, x2, y2 = (int(v) for v in META["objects"][name]["visible_box"])
        centre_z = META["objects"][name]["centre_m"][2]
        inner = depth[(y1 + y2) // 2 - 3:(y1 + y2) // 2 + 3, (x1 + x2) // 2 - 3:(x1 + x2) // 2 + 3] / 1000
        assert abs(np.median(inner) - centre_z) < 0.12, name


def test_transformers_backend_on_the_tiny_checkpoint(tiny_checkpoint: Path):
    result = answered("--image", IMAGE, "--question", "Where is the mug?", "--options", "left", "right",
                      "--model", tiny_checkpoint, "--device", "cpu", "--max-new-tokens", 16)
    assert result["backend"] == "transformers"
    assert result["model"] == str(tiny_checkpoint)
    assert result["prompt_tokens"] > 50 and 0 < result["completion_tokens"] <= 16
    assert result["image_size"] == result["model_image_size"] == [640, 480]
    assert result["status"] in ("complete", "partial", "no_answer") and result["raw_response"]
    assert result["seconds"] > 0 and result["load_seconds"] > 0


def test_openai_backend_against_a_real_transformers_serve(tiny_server: str, tiny_checkpoint: Path):
    result = answered("--backend", "openai", "--server-url", tiny_server, "--model", tiny_checkpoint,
                      "--image", IMAGE, "--question", "Which object is closest?", "--max-new-tokens", 12,
                      "--timeout", 60)
    assert result["backend"] == "openai"
    assert result["model"] == str(tiny_checkpoint)
    assert result["prompt_tokens"] > 50 and 0 < result["completion_tokens"] <= 12
    assert result["seconds"] > 0


def test_replay_with_depth_gives_the_scene_boxes_and_3d_positions_and_annotates(tmp_path: Path):
    out = tmp_path / "annotated.png"
    result = replay(WHERE, "--depth", DEPTH, *INTRINSICS, "--annotate", out)
    assert (result["answer"], result["choice"], result["status"]) == ("(A) left of", "A", "complete")
    assert result["status_message"] == "" and result["observation"] and result["reasoning"]
    assert result["image_size"] == result["model_image_size"] == [640, 480]
    objects = {o["id"]: o for o in result["objects"]}
    assert list(objects) == ["mug.1", "plate.1", "book.1"]
    for name, obj in objects.items():
        truth = META["objects"][name]
        assert obj["label"] == name.split(".")[0]
        assert obj["box"] == pytest.approx(truth["model_box"])        # 640x480 prompt: boxes are image pixels
        position = obj["position_m"]
        assert math.dist((position["x"], position["y"], position["z"]), truth["centre_m"]) < 0.07, name
        assert 0.05 < obj["size_m"]["x"] < 0.35
    assert objects["plate.1"]["position_m"]["z"] < objects["mug.1"]["position_m"]["z"] < \
        objects["book.1"]["position_m"]["z"]
    assert [(r["subject"], r["predicate"], r["object"], r["check"]) for r in result["relations"]] == [
        ("mug.1", "left of", "plate.1", "consistent"), ("book.1", "behind", "plate.1", "consistent")]
    assert result["relations"][0]["check_note"].startswith("mug.1 x=-0.21 m, plate.1 x=+0.08 m (difference 0.28 m")
    assert result["annotated"] == str(out)
    drawn = cv2.imread(str(out), cv2.IMREAD_COLOR)
    original = cv2.imread(str(IMAGE), cv2.IMREAD_COLOR)
    assert drawn.shape == original.shape == (480, 640, 3)
    assert np.count_nonzero(np.any(drawn != original, axis=2)) > 2000, "boxes, labels and arrows were drawn"


def test_depth_as_metres_npy_at_half_resolution_gives_the_same_positions(tmp_path: Path):
    metres = cv2.imread(str(DEPTH), cv2.IMREAD_UNCHANGED).astype(np.float32) / 1000
    half = tmp_path / "depth.npy"
    np.save(half, cv2.resize(metres, (320, 240), interpolation=cv2.INTER_NEAREST))
    full = replay(CLOSEST, "--depth", DEPTH, *INTRINSICS)
    halved = replay(CLOSEST, "--depth", half, *INTRINSICS)   # intrinsics stay those of the 640x480 image
    assert (halved["choice"], halved["status"]) == ("B", "complete")
    for a, b in zip(full["objects"], halved["objects"]):
        assert a["box"] == b["box"]
        assert math.dist(a["position_m"].values(), b["position_m"].values()) < 0.02, a["id"]


def test_scene_only_and_no_depth_give_boxes_without_positions():
    result = replay(WHERE, "--scene-only")
    assert result["answer"] == "" and result["status"] == "complete"
    assert [o["position_m"] for o in result["objects"]] == [None, None, None]
    assert result["raw_response"].endswith("</scene>")
    assert {(r["check"], r["check_note"]) for r in result["relations"]} == {
        ("not_checked", "no depth with this frame: no 3D positions")}


def ask_sample_relations(tmp_path: Path, *args) -> dict:
    replay_file = sample_relations.write_replay(tmp_path / "relations.jsonl")
    return answered("--backend", "replay", "--replay-file", replay_file, "--image", IMAGE,
                    "--question", sample_relations.QUESTION, "--options", *sample_relations.OPTIONS,
                    "--depth", DEPTH, *INTRINSICS, *args)


def test_relations_true_false_and_borderline_are_checked_against_the_depth(tmp_path: Path):
    result = ask_sample_relations(tmp_path)
    relations = result["relations"]
    assert [(r["subject"], r["predicate"], r["object"]) for r in relations] == sample_relations.TRIPLES
    assert [r["check"] for r in relations] == [v.lower() for v in sample_relations.EXPECTED]
    contradicted = relations[1]
    assert contradicted["check_note"].startswith("book.1 z=1.06 m, plate.1 z=0.79 m")
    assert result["status_message"] == f"depth contradicts book.1 in front of plate.1: {contradicted['check_note']}"
    assert (result["answer"], result["choice"], result["status"]) == ("(A) left of", "A", "complete")
    assert relations[3]["check_note"] == "vertical relation: the camera frame does not know which way gravity points"


def test_relation_checks_can_be_turned_off_or_given_a_wider_margin(tmp_path: Path):
    off = ask_sample_relations(tmp_path, "--no-check-relations")
    assert {r["check"] for r in off["relations"]} == {"not_checked"} and off["status_message"] == ""
    wide = ask_sample_relations(tmp_path, "--relation-margin", 0.5)
    assert [r["check"] for r in wide["relations"]][:3] == ["uncertain"] * 3


def test_help_documents_usage():
    done = ask("--help")
    assert done.returncode == 0
    for text in ("--image", "--question", "--backend", "--depth", "--annotate", "exit codes"):
        assert text in done.stdout


@pytest.fixture
def corrupt_image(tmp_path: Path) -> Path:
    path = tmp_path / "corrupt.png"
    path.write_bytes(IMAGE.read_bytes()[:2000])     # a PNG cut short
    return path


@pytest.mark.parametrize(
    "case, code, message",
    [
        ("missing image", 2, "does not exist"),
        ("corrupt image", 2, "cannot decode image file"),
        ("empty question", 2, "the question is empty"),
        ("server down", 3, "is not reachable"),
        ("bad server url", 2, "server URL must start with http"),
        ("depth without intrinsics", 2, "--depth needs the camera intrinsics"),
        ("depth of another aspect", 2, "does not have the aspect"),
        ("unknown question for replay", 3, "no recorded response"),
        ("unknown option", 2, "unrecognized arguments"),
        ("negative relation margin", 2, "the relation margin must be a finite number of metres >= 0"),
    ],
)
def test_errors_are_one_clear_line_with_the_documented_exit_code(case, code, message, tmp_path, corrupt_image):
    base = ["--backend", "replay", "--replay-file", REPLAY, "--question", WHERE["question"]]
    image = ["--image", IMAGE]
    args = {
        "missing image": [*base, "--image", tmp_path / "nope.png"],
        "corrupt image": [*base, "--image", corrupt_image],
        "empty question": ["--backend", "replay", "--replay-file", REPLAY, *image, "--question", "   "],
        "server down": ["--backend", "openai", "--server-url", f"http://127.0.0.1:{free_port()}/v1", *image,
                        "--question", "Where is the mug?", "--timeout", 10],
        "bad server url": ["--backend", "openai", "--server-url", "ftp://gpu/v1", *image, "--question", "q"],
        "depth without intrinsics": [*base, *image, "--depth", DEPTH],
        "depth of another aspect": [*base, *image, "--depth", tmp_path / "square.npy", *INTRINSICS],
        "unknown question for replay": [*base[:-1], "Is this recorded?", *image],
        "unknown option": [*base, *image, "--colour", "red"],
        "negative relation margin": [*base, *image, "--relation-margin", -0.1],
    }[case]
    np.save(tmp_path / "square.npy", np.ones((100, 100), np.float32))
    done = ask(*args, timeout=60)
    assert done.returncode == code, done.stderr
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("spatialthinker-ask: ") and message in last, done.stderr
    if case != "unknown option":            # argparse's own errors come after the usage lines
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
