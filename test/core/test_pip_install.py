"""`pip install .` alone, the route of a GPU server's clients without ROS: a fresh venv (no system site packages, no
ROS wheels, no transformers extra) gets both commands working end to end, and the build leaves the work tree as it
was. The versions come from the lock file, as constraints, so the install is the same on every run and offline
wherever pip's index is on disk (docs/building.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import eval_data
from spatialthinker_ros.evaluation.calibration import ACCURACY_SHARE_PNG, RELIABILITY_PNG
from spatialthinker_ros.testing.http_server import ScriptedHandler, local_http_server

REPO = Path(__file__).resolve().parents[2]
# only the ROS wheels differ between the lock files; the pins of the pip route are the same in each
LOCK = REPO / "requirements" / f"lock-{os.environ.get('ROS_DISTRO', 'jazzy')}.txt"
# the machine's pip settings (index, caches) stay; nothing of this suite's own Python environment leaks in
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _build_outputs() -> set[str]:
    """What a setuptools build writes beside setup.py: its metadata, its staging folders."""
    found = {p.name for p in REPO.glob("*.egg-info")}
    build = REPO / "build"
    return found | ({f"build/{p.name}" for p in build.iterdir() if p.name == "lib" or p.name.startswith("bdist.")}
                    if build.is_dir() else set())


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv with the package installed by `pip install .` from this checkout."""
    before = _build_outputs()
    venv = tmp_path_factory.mktemp("pip-route") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, env=ENV)
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--constraint",
                              str(LOCK), str(REPO)], capture_output=True, text=True, timeout=500, env=ENV)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-4000:]
    assert _build_outputs() == before, "the build wrote into the work tree"
    return venv


def run(venv: Path, command: str, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / command), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def test_the_install_holds_no_ros_and_no_model_stack_and_is_consistent(venv: Path):
    script = "import importlib.util as u; print([m for m in ('rclpy', 'torch', 'transformers') if u.find_spec(m)])"
    done = run(venv, "python", "-c", script)
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr
    check = run(venv, "python", "-m", "pip", "check")
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("command", ["spatialthinker-ask", "spatialthinker-eval"])
def test_both_commands_print_their_help(venv: Path, command: str):
    done = run(venv, command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {command}")


class _Server(ScriptedHandler):
    """An OpenAI-compatible server that answers every chat completion with state["answer"]."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.state["asked"].append((self.path, body))
        answer = self.server.state["answer"]
        payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 700, "completion_tokens": 90}}
        self._send(200, json.dumps(payload).encode())


def test_a_question_through_the_openai_backend_with_depth(venv: Path):
    data = Path(run(venv, "spatialthinker-ask", "--data-dir").stdout.strip())
    assert (data / "sample_scene.png").is_file()   # the package's data came along
    scene = json.loads((data / "sample_scene.json").read_text())   # the rendered scene's camera and true positions
    camera = scene["camera"]
    question = "Where is the mug relative to the plate?"
    recorded = [json.loads(line) for line in (data / "sample_replay.jsonl").read_text().splitlines()]
    answer = next(r["response"] for r in recorded if r["question"] == question)   # the bundled recorded answer
    with local_http_server(_Server, {"answer": answer, "asked": []}) as server:
        done = run(venv, "spatialthinker-ask", "--backend", "openai", "--model", "served",
                   "--server-url", f"http://127.0.0.1:{server.server_address[1]}/v1",
                   "--image", data / "sample_scene.png", "--depth", data / "sample_scene_depth.png",
                   *(f"--{k}={camera[k]}" for k in ("fx", "fy", "cx", "cy")),
                   "--question", question,
                   "--options", "left of", "right of", "behind", "in front of")
        asked = server.state["asked"]
    assert done.returncode == 0, done.stderr
    answered = json.loads(done.stdout)
    assert (answered["backend"], answered["choice"], answered["status"]) == ("openai", "A", "complete")
    mug = next(o for o in answered["objects"] if o["id"] == "mug.1")
    # lifted to 3D from the depth file: the mug's visible surface, within its size of the rendered centre
    position = [mug["position_m"][axis] for axis in "xyz"]
    assert position == pytest.approx(scene["objects"]["mug.1"]["centre_m"], abs=0.05)
    [(path, body)] = asked
    assert path == "/v1/chat/completions" and body["model"] == "served"


def test_an_evaluation_with_probabilities_writes_its_summary_and_pictures(venv: Path, tmp_path: Path):
    path, questions = eval_data.vlmevalkit_parquet(tmp_path)   # parquet: pyarrow
    replay = eval_data.write_replay(tmp_path / "replay.jsonl", questions)
    out = tmp_path / "out"
    done = run(venv, "spatialthinker-eval", "run", path, "--out", out, "--backend", "replay", "--replay-file", replay,
               "--no-progress")
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["total"], summary["correct"]) == (eval_data.EXPECTED["total"], eval_data.EXPECTED["correct"])
    for picture in (RELIABILITY_PNG, ACCURACY_SHARE_PNG):   # matplotlib
        assert (out / picture).read_bytes().startswith(b"\x89PNG")
