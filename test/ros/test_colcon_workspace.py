"""The route ROS users take: `colcon build` in a workspace over an underlay, then the node from install/.

The venv plays the part of /opt/ros/<distro>: it is the underlay (AMENT_PREFIX_PATH, its python3 on PATH), as
`source /opt/ros/jazzy/setup.bash` would make it. The package is copied into a fresh workspace's src/, built by
the venv's colcon exactly as docs/building.md says, and started from install/ in a fresh shell that sources the
workspace. The node must then answer over its service, and it must be the workspace's copy that answers (its
interface libraries are mapped from install/, not from the venv).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

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
STARTUP = 90.0


def underlay_env() -> dict:
    """The environment of a shell that sourced the underlay (here: activated the venv as the ROS prefix)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMENT_", "COLCON_", "CMAKE_PREFIX_PATH"))}
    env.pop("PYTHONPATH", None)
    env.update(VIRTUAL_ENV=str(VENV), PATH=f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               AMENT_PREFIX_PATH=str(VENV), CMAKE_PREFIX_PATH=str(VENV))
    return env


def colcon_build(workspace: Path) -> subprocess.CompletedProcess:
    """The workspace build of docs/building.md, verbatim (rosdep install aside: the underlay already has the dependencies)."""
    return subprocess.run([str(VENV / "bin" / "colcon"), "build", "--packages-select", PACKAGE,
                           "--event-handlers", "console_direct+", "--cmake-args", "-DBUILD_TESTING=OFF"],
                          cwd=workspace, env=underlay_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=BUILD_TIMEOUT)


def test_colcon_workspace_build_installs_a_node_that_answers(tmp_path, spawn, ros_context):
    workspace = tmp_path / "ws"
    shutil.copytree(REPO, workspace / "src" / PACKAGE, ignore=NOT_SOURCES)
    build = colcon_build(workspace)
    assert build.returncode == 0, build.stdout[-6000:]

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


def _process_tree(pid: int) -> list[int]:
    """pid and its descendants (the venv's python re-executes itself once to set its library path)."""
    import psutil

    root = psutil.Process(pid)
    return [pid, *(child.pid for child in root.children(recursive=True))]
