"""bringup.launch.py's contract, checked without `launch` (not installable here), then on the real node.

The launch file is executed against recording stand-ins for launch/launch_ros, which capture exactly
what it would start. The same arguments then start the real node process with the --ros-args that
launch_ros would pass, and a request through the remapped topics and namespace must succeed.
"""

import builtins
import json
import re
import sys
import types
from pathlib import Path

import pytest
import yaml
from rcl_interfaces.srv import ListParameters
from spatialthinker_ros.testing.fake_cameras import FakeCamera
from spatialthinker_ros.testing.node_client import NodeClient, spin_future, spin_until
from spatialthinker_ros.testing.processes import node_command, node_executable

from spatialthinker_ros.launch_config import LAUNCH_ARGUMENTS, node_launch, ros_arguments
from spatialthinker_ros.ros.parameters import BY_NAME, PARAMETERS, descriptor

REPO = Path(__file__).resolve().parents[2]
SHARE = Path(sys.prefix) / "share" / "spatialthinker_ros"


class Recorded:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class FakeLaunchConfiguration:
    def __init__(self, name):
        self.name = name

    def perform(self, context):
        return context.values[self.name]


@pytest.fixture
def launch_file():
    """bringup.launch.py executed with recording stand-ins for the launch packages. Its own imports resolve
    them (an __import__ of the file's globals only): nothing process-wide changes, and a real `launch` is not
    shadowed for anyone else."""
    modules = {
        "launch": types.SimpleNamespace(LaunchDescription=Recorded),
        "launch.actions": types.SimpleNamespace(DeclareLaunchArgument=Recorded, OpaqueFunction=Recorded),
        "launch.substitutions": types.SimpleNamespace(LaunchConfiguration=FakeLaunchConfiguration),
        "launch_ros": types.SimpleNamespace(),
        "launch_ros.actions": types.SimpleNamespace(Node=Recorded),
    }

    def launch_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name in modules:
            return modules[name if fromlist else name.partition(".")[0]]
        return builtins.__import__(name, globals, locals, fromlist, level)

    path = REPO / "launch" / "bringup.launch.py"
    module = types.ModuleType("bringup_launch")
    module.__file__ = str(path)
    module.__builtins__ = {**vars(builtins), "__import__": launch_import}
    exec(compile(path.read_text(), str(path), "exec"), vars(module))
    return module


def run_launch(launch_file, **values):
    description = launch_file.generate_launch_description()
    entities = description.args[0]
    declared = {e.args[0]: e.kwargs for e in entities if "default_value" in e.kwargs}
    opaque = [e for e in entities if "function" in e.kwargs][0]
    defaults = {name: kwargs["default_value"] for name, kwargs in declared.items()}
    context = types.SimpleNamespace(values={**defaults, **values})
    return declared, opaque.kwargs["function"](context)


def test_launch_declares_every_argument_with_description(launch_file):
    declared, _ = run_launch(launch_file)
    assert set(declared) == set(LAUNCH_ARGUMENTS)
    for name, (default, description) in LAUNCH_ARGUMENTS.items():
        assert declared[name]["default_value"] == default and declared[name]["description"] == description
    for required in ("image_topic", "depth_topic", "camera_info_topic", "model", "backend", "device", "params_file",
                     "namespace", "use_rviz"):
        assert required in declared


def test_launch_defaults_start_one_node_with_the_shipped_params_file(launch_file):
    _, actions = run_launch(launch_file)
    assert len(actions) == 1
    node = actions[0].kwargs
    assert (node["package"], node["executable"], node["name"]) == ("spatialthinker_ros", "spatialthinker_node",
                                                                   "spatialthinker")
    assert node["namespace"] == ""
    assert node["parameters"] == [str(SHARE / "config" / "spatialthinker.yaml"), {}]
    assert node["remappings"] == []


def test_launch_arguments_become_remappings_parameters_and_rviz(launch_file):
    _, actions = run_launch(launch_file, namespace="robot1", image_topic="/cam/color/image_raw",
                            depth_topic="/cam/depth/image_raw", camera_info_topic="/cam/depth/camera_info",
                            backend="openai", model="OX-PIXL/SpatialThinker-3B", device="cuda:1",
                            server_url="http://10.0.0.5:8000/v1", params_file="/etc/st.yaml", use_rviz="true",
                            log_level="debug")
    node, rviz = (a.kwargs for a in actions)
    assert node["namespace"] == "robot1"
    assert node["parameters"] == ["/etc/st.yaml", {"backend": "openai", "model": "OX-PIXL/SpatialThinker-3B",
                                                    "device": "cuda:1", "server_url": "http://10.0.0.5:8000/v1"}]
    assert sorted(node["remappings"]) == sorted([("image", "/cam/color/image_raw"), ("depth", "/cam/depth/image_raw"),
                                                 ("camera_info", "/cam/depth/camera_info")])
    assert node["arguments"] == ["--ros-args", "--log-level", "debug"]
    assert (rviz["package"], rviz["executable"]) == ("rviz2", "rviz2")
    assert rviz["arguments"] == ["-d", str(SHARE / "rviz" / "spatialthinker.rviz")]
    assert (SHARE / "rviz" / "spatialthinker.rviz").is_file()


def test_bad_launch_arguments_are_refused():
    with pytest.raises(ValueError, match="use_rviz"):
        node_launch({"use_rviz": "maybe"}, SHARE)
    with pytest.raises(ValueError, match="unknown launch arguments"):
        node_launch({"camera": "x"}, SHARE)


def test_shipped_params_file_matches_the_declared_parameters():
    shipped = yaml.safe_load((REPO / "config" / "spatialthinker.yaml").read_text())["/**"]["ros__parameters"]
    assert list(shipped) == [spec.name for spec in PARAMETERS]
    for spec in PARAMETERS:
        assert shipped[spec.name] == spec.default, spec.name
    readme = (REPO / "docs" / "node.md").read_text()
    for spec in PARAMETERS:
        assert f"`{spec.name}`" in readme, f"docs/node.md does not document parameter {spec.name}"
        row = re.search(rf"^\| `{spec.name}` \| [^|]+ \| ([^|]+) \|", readme, re.MULTILINE)
        assert row and row.group(1).strip() == spec.applies, f"docs/node.md says {spec.name} applies {row and row.group(1)}"
    # `ros2 param describe` tells the same: a parameter read once at start does not claim to apply at configure
    assert descriptor(BY_NAME["keep_frame_memory"]).description.endswith("(read once when the node starts)")
    assert descriptor(BY_NAME["max_image_age"]).description.endswith("(applies to the next request)")


def test_launch_arguments_drive_the_real_node(spawn, ros_context, tmp_path):
    replay = tmp_path / "replay.jsonl"
    replay.write_text(json.dumps({"question": "Where is the cup?", "response":
                                  '<scene>{"objects": [{"id": "cup.1", "bbox": [1, 2, 3, 4]}]}</scene>'
                                  "<answer>left</answer>"}) + "\n")
    launch = node_launch({"namespace": "robot1", "image_topic": "/cam/color/image", "backend": "replay",
                          "replay_file": str(replay), "log_level": "info"}, SHARE)
    proc = spawn([*node_executable(), *ros_arguments(launch)], name="launched-node")
    camera = FakeCamera(ros_context, prefix="/cam/color/", width=320, height=240)
    client = NodeClient(ros_context, "/robot1/spatialthinker", node_name="launch_client", outputs=False)
    node = client.node
    try:
        response = client.ask_until_ready(proc, question="Where is the cup?")
        assert response.success, response.message + proc.output()
        assert response.answer.model == "replay" and response.answer.answer == "left"
        assert response.answer.scene_graph.image_width == 320, "frames came through the remapped topic"
        lister = node.create_client(ListParameters, "/robot1/spatialthinker/list_parameters")
        assert spin_until(node, lister.service_is_ready, 30.0)
        names = spin_future(node, lister.call_async(ListParameters.Request()), 30.0).result.names
        assert {spec.name for spec in PARAMETERS} <= set(names)
    finally:
        camera.close()
        client.close()
