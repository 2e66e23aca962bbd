"""spatialthinker_camera: an image file, and optionally a registered depth file with intrinsics, published as a
camera at a fixed rate, like ROS's image_publisher (which has no wheel for the PyPI route): the node without a
camera, e.g. the README's offline recipe.

Topics are relative, so a namespace or remapping moves them as it does a driver's: `image` (rgb8), or
`image/compressed` with --compressed; with --depth also `depth` (16UC1 millimetres, or 32FC1 metres for any other
scale) and `camera_info` (the intrinsics, no distortion). Every frame has one stamp; depth and camera_info go
out before the colour frame, with sensor-data QoS, as from a driver. The files pass the same checks as
spatialthinker-ask's (size from the header before decoding, depth registered to the image).

Exit codes: 0 stopped by SIGINT or SIGTERM, 2 bad usage or input file.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

from spatialthinker_ros.cli_files import read_depth_and_intrinsics, read_image
from spatialthinker_ros.cli_options import EXIT_OK, EXIT_USAGE, UsageError, add_depth_arguments
from spatialthinker_ros.core.request import MAX_REQUEST_IMAGE_PIXELS

PROG = "spatialthinker_camera"

EPILOG = """\
example: the bundled scene as an RGB-D camera, on image, depth and camera_info (DATA: spatialthinker-ask --help)
  spatialthinker_camera --image $DATA/sample_scene.png --depth $DATA/sample_scene_depth.png \\
      --fx 525 --fy 525 --cx 319.5 --cy 239.5
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", required=True, type=Path, metavar="FILE",
                        help="colour image (PNG, JPEG, BMP, TIFF, WebP, ...)")
    parser.add_argument("--rate", type=float, default=10.0, metavar="HZ",
                        help="frames per second (default %(default)s)")
    parser.add_argument("--frame-id", default="camera_color_optical_frame",
                        help="header.frame_id (default %(default)s)")
    parser.add_argument("--compressed", choices=("jpeg", "png"),
                        help="publish image/compressed in this format instead of raw rgb8 on image")
    add_depth_arguments(parser, "depth (optional): also publish depth and camera_info")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from rclpy.utilities import remove_ros_args

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(remove_ros_args([PROG, *argv])[1:])
    except SystemExit as exit_:        # argparse has printed usage and the error (or the help)
        return int(exit_.code or 0)
    try:
        messages = _messages(args)
    except UsageError as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USAGE
    rclpy.init(args=[PROG, *argv])
    node = None
    try:
        node = _camera_node(messages, args)
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return EXIT_OK


def _messages(args: argparse.Namespace) -> dict:
    """topic -> the message to publish, each built once (only the header changes per frame)."""
    from std_msgs.msg import Header

    from spatialthinker_ros.ros.conversions import (camera_info_msg, depth_to_image_msg, rgb_to_compressed_msg,
                                                    rgb_to_image_msg)

    if not (math.isfinite(args.rate) and args.rate > 0):
        raise UsageError(f"--rate must be a positive number of frames per second, not {args.rate}")
    rgb = read_image(args.image, MAX_REQUEST_IMAGE_PIXELS)
    height, width = rgb.shape[:2]
    depth, intrinsics = read_depth_and_intrinsics(args, (width, height), MAX_REQUEST_IMAGE_PIXELS)
    messages = {}
    if depth is not None:     # before the colour frame of the same stamp, as the node pairs them
        messages["depth"] = depth_to_image_msg(depth, Header())
        messages["camera_info"] = camera_info_msg(intrinsics, Header())
    if args.compressed:
        messages["image/compressed"] = rgb_to_compressed_msg(rgb, Header(), args.compressed)
    else:
        messages["image"] = rgb_to_image_msg(rgb, Header())
    return messages


def _camera_node(messages: dict, args: argparse.Namespace):
    from rclpy.node import Node
    from rclpy.qos import qos_profile_sensor_data
    from std_msgs.msg import Header

    node = Node("spatialthinker_camera")
    publishers = [(node.create_publisher(type(msg), topic, qos_profile_sensor_data), msg)
                  for topic, msg in messages.items()]

    def publish() -> None:
        header = Header(stamp=node.get_clock().now().to_msg(), frame_id=args.frame_id)
        for publisher, msg in publishers:
            msg.header = header
            publisher.publish(msg)

    node.create_timer(1.0 / args.rate, publish)
    colour = messages.get("image") or messages["image/compressed"]
    what = colour.encoding if hasattr(colour, "encoding") else colour.format
    node.get_logger().info(
        f"publishing {args.image} ({what}) at {args.rate:g} Hz on "
        + ", ".join(publisher.topic_name for publisher, _ in publishers))
    return node


if __name__ == "__main__":
    raise SystemExit(main())
