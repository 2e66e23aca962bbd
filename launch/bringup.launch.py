"""Start spatialthinker_node (and optionally RViz).

    ros2 launch spatialthinker_ros bringup.launch.py image_topic:=/camera/color/image_raw \
        depth_topic:=/camera/aligned_depth_to_color/image_raw \
        camera_info_topic:=/camera/aligned_depth_to_color/camera_info use_rviz:=true

`ros2 launch spatialthinker_ros bringup.launch.py --show-args` lists every argument. What each argument
becomes is decided in spatialthinker_ros/launch_config.py (tested without `launch`).
"""

from pathlib import Path

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from spatialthinker_ros.launch_config import LAUNCH_ARGUMENTS, PACKAGE, node_launch


def _nodes(context):
    values = {name: LaunchConfiguration(name).perform(context) for name in LAUNCH_ARGUMENTS}
    launch = node_launch(values, Path(get_package_share_directory(PACKAGE)))
    actions = [Node(
        package=PACKAGE,
        executable=launch.executable,
        name=launch.name,
        namespace=launch.namespace,
        parameters=[launch.params_file, launch.parameters],
        remappings=list(launch.remappings),
        arguments=["--ros-args", "--log-level", launch.log_level],
        output="screen",
        emulate_tty=True,
    )]
    if launch.rviz_config:
        actions.append(Node(package="rviz2", executable="rviz2", name="rviz2",
                            arguments=["-d", launch.rviz_config], output="screen"))
    return actions


def generate_launch_description():
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=description)
         for name, (default, description) in LAUNCH_ARGUMENTS.items()]
        + [OpaqueFunction(function=_nodes)]
    )
