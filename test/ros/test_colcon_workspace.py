"""The route ROS users take: `colcon build` in a workspace over an underlay, the node from install/, `colcon test`.

The venv plays the part of /opt/ros/<distro>: it is the underlay (AMENT_PREFIX_PATH, its python3 on PATH), as
`source /opt/ros/jazzy/setup.bash` would make it. The package is copied into a fresh workspace's src/, built by
the venv's colcon exactly as docs/building.md says, and started from install/ in a fresh shell that sources the
workspace. The node must then answer over its service, and it must be the workspace's copy that answers (its
interface libraries are mapped from install/, not from the venv). `colcon test` then runs the core tests against
install/ and `colcon test-result` reports them.
"""

import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import numpy as np
from sensor_msgs.msg import Image

from spatialthinker_ros.testing.node_client import NodeClient

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)
PACKAGE = "spatialthinker_ros"
# What a clone holds beside the package's own files: never copied into the workspace.
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv*", "build", "build-*", "build*.log", "__pycache__",
                                     ".pytest_cache", ".hypothesis", "demo_output", "install", "log")
BUILD_TIMEOUT = 900.0
TEST_TIMEOUT = 600.0
STARTUP = 90.0
# `colcon test` runs every core test (CMakeLists.txt); here, where the whole suite already ran from the venv, a
# fast subset through pytest's PYTEST_ADDOPTS: the manifest, prompts, the parser, and the installed
# spatialthinker-ask (the tiny checkpoint included). The modules that must have run:
WORKSPACE_CORE_TESTS = ("test_package_manifest", "test_prompt", "test_parsing", "test_cli")


def underlay_env() -> dict:
    """The environment of a shell that sourced the underlay (here: activated the venv as the ROS prefix)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMENT_", "COLCON_", "CMAKE_PREFIX_PATH"))}
    env.pop("PYTHONPATH", None)
    env.update(VIRTUAL_ENV=str(VENV), PATH=f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               AMENT_PREFIX_PATH=str(VENV), CMAKE_PREFIX_PATH=str(VENV))
    return env


def colcon(workspace: Path, *args: str, env: dict | None = None,
           timeout: float = BUILD_TIMEOUT) -> subprocess.CompletedProcess:
    """The underlay's colcon in the workspace, as docs/building.md runs it; output and errors in stdout."""
    return subprocess.run([str(VENV / "bin" / "colcon"), *args], cwd=workspace, env=env or underlay_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A fresh workspace with the package built by the build line of docs/building.md, verbatim (rosdep install
    aside: the underlay already has the dependencies)."""
    workspace = tmp_path_factory.mktemp("colcon") / "ws"
    shutil.copytree(REPO, workspace / "src" / PACKAGE, ignore=NOT_SOURCES)
    build = colcon(workspace, "build", "--packages-select", PACKAGE, "--event-handlers", "console_direct+")
    assert build.returncode == 0, build.stdout[-6000:]
    return workspace


def test_colcon_workspace_build_installs_a_node_that_answers(workspace, tmp_path, spawn, ros_context):
    install = workspace / "install" / PACKAGE
    share = install / "share" / PACKAGE
    for shipped in ("launch/bringup.launch.py", "config/spatialthinker.yaml", "rviz/spatialthinker.rviz",
                    "config/fastdds_large_images.xml", "package.xml"):
        assert (share / shipped).is_file(), f"{shipped} not installed into {share}"
    executable = install / "lib" / PACKAGE / "spatialthinker_node"   # what `ros2 run` starts
    assert os.access(executable, os.X_OK)

    replay = tmp_path / "replay.jsonl"
    replay.write_text('{"question": "Where is the cup?", "response": "<scene>{\\"objects\\": [{\\"id\\": '
                      '\\"cup.1\\", \\"bbox\\": [10, 20, 60, 80]}]}</scene><answer>left</answer>"}\n')
    # A fresh shell: the underlay, then the workspace's setup.bash, then the installed executable.
    command = (f"source {workspace / 'install' / 'setup.bash'} && exec {executable} --ros-args "
               f"-p backend:=replay -p replay_file:={replay} -p use_depth:=false")
    proc = spawn(["bash", "--noprofile", "--norc", "-c", command], name="colcon-node", env=underlay_env())

    client = NodeClient(ros_context, node_name="colcon_client", outputs=False)
    try:
        client.wait_for_service(proc, STARTUP)
        rgb = np.zeros((120, 160, 3), np.uint8)
        response = client.ask(60.0, question="Where is the cup?", image=Image(
            height=120, width=160, encoding="rgb8", step=160 * 3, data=rgb.tobytes()))
        assert response.success, response.message + proc.output()
        assert response.answer.answer == "left" and response.answer.model == "replay"
        assert [o.id for o in response.answer.scene_graph.objects] == ["cup.1"]

        # The node that answered runs the workspace's build: its generated interface libraries come from install/.
        maps = "".join(Path(f"/proc/{pid}/maps").read_text() for pid in _process_tree(proc.pid))
        assert f"{install}/lib/lib{PACKAGE}__rosidl_typesupport_c.so" in maps, "node did not load the workspace"
    finally:
        client.close()


def test_colcon_test_runs_the_core_tests_against_the_workspace_and_test_result_reports_them(workspace):
    selection = " or ".join(WORKSPACE_CORE_TESTS)
    env = dict(underlay_env(), PYTEST_ADDOPTS=f"-k '{selection}'")
    tested = colcon(workspace, "test", "--packages-select", PACKAGE, "--event-handlers", "console_direct+",
                    env=env, timeout=TEST_TIMEOUT)
    assert tested.returncode == 0, tested.stdout[-6000:]

    junit = workspace / "build" / PACKAGE / "test_results" / PACKAGE / "core_tests.xunit.xml"
    suite = ET.parse(junit).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    cases = suite.findall("testcase")
    # classname: spatialthinker_ros.test.core.<module>[.<class>]
    modules = {next(part for part in case.get("classname").split(".") if part.startswith("test_")) for case in cases}
    assert set(WORKSPACE_CORE_TESTS) <= modules, modules
    assert int(suite.get("failures")) == int(suite.get("errors")) == 0

    result = colcon(workspace, "test-result", "--verbose", timeout=60.0)
    assert result.returncode == 0, result.stdout
    summary = re.search(r"Summary: (\d+) tests, (\d+) errors, (\d+) failures", result.stdout)
    assert summary, result.stdout
    # every JUnit file under build/: the core tests' and ctest's own (one test: core_tests)
    assert int(summary[1]) >= len(cases) and (int(summary[2]), int(summary[3])) == (0, 0)


def _process_tree(pid: int) -> list[int]:
    """pid and its descendants (the venv's python re-executes itself once to set its library path)."""
    import psutil

    root = psutil.Process(pid)
    return [pid, *(child.pid for child in root.children(recursive=True))]
