"""spatialthinker-ask as installed, run as a user runs it: a subprocess on files, JSON on stdout, one-line errors."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import cv2
import numpy as np
import pytest
import sample_relations
from spatialthinker_ros.testing.processes import free_port, installed_executable

import spatialthinker_ros
from spatialthinker_ros.testing.http_server import local_http_server

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
    stated = sample_relations.stated_positions(result["relations"][0]["check_note"], "mug.1", "x", "plate.1")
    assert stated == pytest.approx((objects["mug.1"]["position_m"]["x"], objects["plate.1"]["position_m"]["x"]),
                                   abs=0.005)
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
    objects = {o["id"]: o["position_m"] for o in result["objects"]}
    stated = sample_relations.stated_positions(contradicted["check_note"], "book.1", "z", "plate.1")
    assert stated == pytest.approx((objects["book.1"]["z"], objects["plate.1"]["z"]), abs=0.005)
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


# ---- a model that cannot load, hub messages, the data folder ---------------------------------------------------

def test_a_model_that_cannot_load_is_one_line_and_exit_3(tiny_checkpoint: Path):
    """As --help promises for a backend error, also when it happens while loading the model."""
    import torch

    cases = {"hub model offline (not cached)": ["--device", "cpu"]}
    if not torch.cuda.is_available():
        cases["--device cuda without CUDA"] = ["--model", tiny_checkpoint, "--device", "cuda"]
    for case, args in cases.items():
        done = ask("--image", IMAGE, "--question", "Where is the mug?", *args)     # the suite runs HF_HUB_OFFLINE=1
        assert done.returncode == 3, (case, done.stderr)
        assert done.stdout == "" and "Traceback" not in done.stderr, (case, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("spatialthinker-ask: backend error (unavailable): "), lines


@dataclasses.dataclass
class HubState:
    downloads: int = 0   # file downloads asked for so far


class FlakyHub(BaseHTTPRequestHandler):
    """A model hub whose first file downloads fail with 503 (the client retries), then have no such file (404)."""

    def _answer(self) -> None:
        downloads = "/resolve/" in self.path
        self.server.state.downloads += downloads
        self.send_response(503 if downloads and self.server.state.downloads <= 3 else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _answer

    def log_message(self, *args) -> None:
        pass


def test_hub_retry_warnings_are_printed_once_each(tmp_path: Path):
    with local_http_server(FlakyHub, HubState()) as hub:
        env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{hub.server_port}", HF_HUB_OFFLINE="0",
                   TRANSFORMERS_OFFLINE="0", HF_HOME=str(tmp_path / "hf-home"))
        done = subprocess.run([str(ASK), "--image", str(IMAGE), "--question", "q", "--device", "cpu"],
                              capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 3, done.stderr
    retries = [line for line in done.stderr.splitlines() if "Retrying in" in line]
    assert retries and len(retries) == len(set(retries)), done.stderr      # each retry once
    assert all(line.startswith("spatialthinker-ask: ") for line in done.stderr.splitlines()), done.stderr


def test_the_data_folder_line_of_the_help_works_outside_the_venv(tmp_path: Path):
    """--help says DATA=$(spatialthinker-ask --data-dir); a shell without the venv's python on PATH runs it."""
    assert "DATA=$(spatialthinker-ask --data-dir)" in ask("--help").stdout
    shell = f'DATA=$("{ASK}" --data-dir) && ls "$DATA"'
    done = subprocess.run(["/bin/sh", "-c", shell], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert {"sample_scene.png", "sample_scene_depth.png", "sample_replay.jsonl"} <= set(done.stdout.split())


# ---- an image that declares more pixels than the limit ---------------------------------------------------------

def declaring_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A PNG of at most 50 KB whose header declares width x height pixels (20000 x 20000: 1.2 GB as colour)."""
    from PIL import Image

    Image.new("1", (width, height)).save(path)
    assert path.stat().st_size < 200_000
    return path


def peak_rss_mb(script: str) -> tuple[str, float]:
    """Runs a python script in a fresh process; its stdout and its peak resident memory in MB (VmHWM: unlike
    ru_maxrss, it does not carry the parent's peak over the exec)."""
    code = (f"{script}\nimport re\n"
            "print(int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) / 1024)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    *lines, peak = done.stdout.strip().splitlines()
    return "\n".join(lines), float(peak)


@pytest.mark.parametrize("as_what, side, named", [
    ("--image", 20000, "more than 178956970 pixels"),   # over twice Pillow's own limit: Pillow refuses it
    ("--image", 9000, "image of 9000x9000 exceeds the 16777216-pixel limit"),     # 243 MB as colour, under Pillow's limit, over ours (16.7 M)
    ("--depth", 20000, "more than 178956970 pixels"),
])
def test_an_image_file_declaring_too_many_pixels_is_refused_before_it_is_decoded(as_what, side, named, tmp_path):
    bomb = declaring_png(tmp_path / "bomb.png", side, side)
    image = bomb if as_what == "--image" else IMAGE
    depth = ["--depth", str(bomb), *map(str, INTRINSICS)] if as_what == "--depth" else []
    argv = ["--backend", "replay", "--replay-file", str(REPLAY), "--image", str(image),
            "--question", WHERE["question"], *depth]
    out, peak = peak_rss_mb(f"import contextlib, io, sys\nfrom spatialthinker_ros import cli\n"
                            f"err = io.StringIO()\nwith contextlib.redirect_stderr(err):\n"
                            f"    code = cli.main({argv!r})\nprint(code, err.getvalue().strip())")
    if as_what == "--image":   # as the node refuses a request image of that size
        assert out.startswith("2 spatialthinker-ask: error (invalid_request): request image: "), out
    else:
        assert out.startswith("2 spatialthinker-ask: error: depth file ") and "bomb.png" in out, out
    assert named in out, out
    assert peak < 200, f"peak {peak:.0f} MB: the image was decoded"


def test_an_evaluation_row_image_declaring_too_many_pixels_is_a_bad_row_before_decoding(tmp_path: Path):
    bomb = declaring_png(tmp_path / "bomb.png")
    out, peak = peak_rss_mb("from spatialthinker_ros.evaluation.data import BadRowError, decode_image\n"
                            f"try:\n    decode_image(open({str(bomb)!r}, 'rb').read())\n"
                            "except BadRowError as exc:\n    print(exc)")
    assert "header declares more than 178956970 pixels" in out, out
    assert peak < 200, f"peak {peak:.0f} MB: the image was decoded"
