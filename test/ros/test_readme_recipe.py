"""The README's offline recipe (node on replay, spatialthinker_camera, one question), run exactly as written."""

import re
import sys
import time
from pathlib import Path

import psutil
import pytest

from spatialthinker_ros.harness import WaitFailed

pytestmark = pytest.mark.timeout(240)

README = Path(__file__).resolve().parents[2] / "README.md"
RECIPE = re.compile(r"<!-- offline recipe: begin -->\n```bash\n(.*?)```\n<!-- offline recipe: end -->", re.S)
RUN_S = 120.0


def test_the_readme_offline_recipe_answers_with_3d_positions(spawn, tmp_path):
    [recipe] = RECIPE.findall(README.read_text())
    # The recipe runs from the repository root, where .venv is; here .venv is this test's own environment
    # (.venv-kilted under ROS_DISTRO=kilted).
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(Path(sys.prefix))
    (work / "recipe.sh").write_text(recipe)
    shell = spawn(["bash", "-c", 'cd "$0" && exec bash recipe.sh', str(work)], name="recipe")
    started: dict[int, psutil.Process] = {}   # the node and the camera it starts in the background
    try:
        deadline = time.monotonic() + RUN_S
        while shell.alive():
            try:
                for child in psutil.Process(shell.pid).children(recursive=True):
                    started.setdefault(child.pid, child)
            except psutil.NoSuchProcess:
                pass
            if time.monotonic() > deadline:
                raise WaitFailed(f"the recipe did not finish within {RUN_S:.0f} s: {shell.describe}")
            time.sleep(0.2)
        output = shell.output()
        assert shell.exit_code() == 0, output
        assert "answer: (A) left of" in output, output
        objects = [line for line in output.splitlines() if re.match(r"^\w+\.\d+ ", line)]
        assert len(objects) >= 3 and all(re.search(r"z \d\.\d\d m$", line) for line in objects), output
        # `kill %1 %2` stopped the node and the camera
        assert psutil.wait_procs(list(started.values()), timeout=15)[1] == [], "the recipe left processes running"
    finally:
        for process in started.values():   # only what the recipe started, by pid
            if process.is_running():
                process.kill()
