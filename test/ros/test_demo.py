"""`python -m spatialthinker_ros.demo` (what `make demo` runs) end to end: tiny model, then replay, offline."""

import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

pytestmark = pytest.mark.timeout(300)

NOISE = "ITS ANSWERS ARE NOISE"
REAL_MODEL = "make demo MODEL=OX-PIXL/SpatialThinker-7B DEVICE=cuda"


def test_demo_runs_both_parts_and_writes_annotated_images(tmp_path: Path):
    output = tmp_path / "out"
    # -P: the working directory (here a temp dir, in `make demo` the source tree) must not shadow the install
    command = [sys.executable, "-P", "-m", "spatialthinker_ros.demo", "--output", str(output),
               "--cache-dir", str(tmp_path / "tiny"), "--max-new-tokens", "24", "--timeout", "90", "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    out = done.stdout
    # the disclaimer and the way to the real model come first and last
    head, tail = out[: out.index("Part 1")], out[out.index("Done."):]
    for part in (head, tail):
        assert NOISE in part and REAL_MODEL in part
    # the action's feedback stages were printed as they came
    assert "feedback: queued" in out and "feedback: generating" in out
    assert "feedback: scene ready" in out and "scene graph already available: mug.1, plate.1, book.1" in out
    # the replay part shows the meaningful scene with 3D positions
    replay = json.loads((output / "replay_answers.json").read_text())
    assert [(a["asked_by"], a["answer"], a["status"]) for a in replay] == [
        ("action", "(A) left of", "complete"), ("service", "(B) the plate", "complete")]
    assert all(o["position_m"] is not None for a in replay for o in a["objects"])
    assert "mug.1" in out and "centre (" in out
    tiny = json.loads((output / "tiny_model_answers.json").read_text())
    assert [a["asked_by"] for a in tiny] == ["action", "service"]
    assert all(0 < a["completion_tokens"] <= 24 and a["model"] == str(tmp_path / "tiny") for a in tiny)
    for name in ("tiny_model_action", "tiny_model_service", "replay_action", "replay_service"):
        image = cv2.imread(str(output / f"{name}.png"), cv2.IMREAD_COLOR)
        assert image is not None and image.shape == (480, 640, 3), name
    assert "the node exited with code" not in out, "each node stops cleanly on the demo's SIGINT"
    assert (output / "tiny_model_node.log").stat().st_size and (output / "replay_node.log").stat().st_size
