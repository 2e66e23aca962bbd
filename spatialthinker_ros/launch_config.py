"""What bringup.launch.py turns its arguments into, kept free of the `launch` library so it can be tested
anywhere and reused by scripts that start the node directly (`ros_arguments`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "spatialthinker_ros"
EXECUTABLE = "spatialthinker_node"
NODE_NAME = "spatialthinker"

# name -> (default, description). An empty default for a parameter override means "keep params_file's value".
LAUNCH_ARGUMENTS: dict[str, tuple[str, str]] = {
    "namespace": ("", "namespace of the node"),
    "params_file": ("", "parameters YAML; default: share/spatialthinker_ros/config/spatialthinker.yaml"),
    "image_topic": ("image", "colour image topic (sensor_msgs/Image) of the default camera"),
    "compressed_image_topic": ("image/compressed", "sensor_msgs/CompressedImage topic (image_transport:=compressed)"),
    "depth_topic": ("depth", "depth image topic (16UC1 mm or 32FC1 m) of the default camera"),
    "camera_info_topic": ("camera_info", "CameraInfo topic of the depth image"),
    "backend": ("", "transformers | openai | replay (overrides params_file)"),
    "model": ("", "hub id or local checkpoint directory (overrides params_file)"),
    "device": ("", "auto | cuda | cuda:N | cpu (overrides params_file)"),
    "server_url": ("", "OpenAI-compatible server URL for backend openai (overrides params_file)"),
    "replay_file": ("", "JSON Lines of recorded responses for backend replay (overrides params_file)"),
    "use_rviz": ("false", "also start RViz with rviz/spatialthinker.rviz"),
    "log_level": ("info", "debug | info | warn | error"),
}
PARAMETER_OVERRIDES = ("backend", "model", "device", "server_url", "replay_file")
TOPIC_REMAPPINGS = {"image_topic": "image", "compressed_image_topic": "image/compressed",
                    "depth_topic": "depth", "camera_info_topic": "camera_info"}


@dataclass(frozen=True)
class NodeLaunch:
    executable: str
    name: str
    namespace: str
    params_file: str
    parameters: dict[str, str] = field(default_factory=dict)
    remappings: tuple[tuple[str, str], ...] = ()
    log_level: str = "info"
    rviz_config: str | None = None   # path when RViz should start


def node_launch(values: dict[str, str], share_dir: Path) -> NodeLaunch:
    """Resolve launch argument values (missing ones take their defaults) into what to start."""
    unknown = set(values) - set(LAUNCH_ARGUMENTS)
    if unknown:
        raise ValueError(f"unknown launch arguments: {sorted(unknown)}")
    args = {name: values.get(name, default) for name, (default, _) in LAUNCH_ARGUMENTS.items()}
    use_rviz = args["use_rviz"].strip().lower()
    if use_rviz not in ("true", "false"):
        raise ValueError(f"use_rviz must be true or false, not {args['use_rviz']!r}")
    return NodeLaunch(
        executable=EXECUTABLE,
        name=NODE_NAME,
        namespace=args["namespace"],
        params_file=args["params_file"] or str(share_dir / "config" / "spatialthinker.yaml"),
        parameters={name: args[name] for name in PARAMETER_OVERRIDES if args[name]},
        remappings=tuple((target, args[arg]) for arg, target in TOPIC_REMAPPINGS.items() if args[arg] != target),
        log_level=args["log_level"],
        rviz_config=str(share_dir / "rviz" / "spatialthinker.rviz") if use_rviz == "true" else None,
    )


def parameter_arguments(params: dict[str, object]) -> list[str]:
    """`-p name:=value` for each parameter, the value written as ROS parameter YAML (true/false, [a,b])."""
    args = []
    for name, value in params.items():
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, (list, tuple)):
            value = "[" + ",".join(str(v) for v in value) + "]"
        args += ["-p", f"{name}:={value}"]
    return args


def ros_arguments(launch: NodeLaunch) -> list[str]:
    """The same node started without `launch`: the --ros-args a launch_ros Node would pass."""
    args = ["--ros-args", "-r", f"__node:={launch.name}"]
    if launch.namespace:
        args += ["-r", f"__ns:=/{launch.namespace.strip('/')}"]
    args += ["--params-file", launch.params_file]
    for name, value in launch.parameters.items():
        args += ["-p", f"{name}:={value}"]
    for source, target in launch.remappings:
        args += ["-r", f"{source}:={target}"]
    args += ["--log-level", launch.log_level]
    return args
