"""Helper processes for the ROS benchmarks, each started by a bench script as its own process.

    publisher   a camera driver: colour (rgb8 or JPEG) + 16UC1 depth + CameraInfo at a fixed rate, sensor data QoS
    subscriber  the bare-rclpy reference: subscribes to the same topics with the node's QoS and keeps the latest;
                --convert and --executor multi give the designs the node does not use (the "before" figures):
                converting every frame on arrival, and a MultiThreadedExecutor
    floor       a bare AskSpatial server that answers at once, plus an Image echo (ping -> pong) for round trips

Each writes a small JSON status file about once a second (counts), so the parent can see it is working without
joining the ROS graph. The parent sets the isolation environment (spatialthinker_ros.testing.isolation.isolate_ros)
before starting it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from spatialthinker_ros.ros.camera_inputs import camera_qos
from spatialthinker_ros.testing.processes import stop_on_sigterm

CAMERA_QOS = camera_qos("best_effort")   # what spatialthinker_node subscribes with (ros/camera_inputs.py)
JPEG_QUALITY = 90   # the JPEG sizes in bench/README.md were measured at this quality


def camera_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A frame with structure and mild sensor noise, so JPEG sizes resemble a real camera's (not a flat image)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1),
                    ((x // 48 + y // 48) % 2) * 200 + 20], axis=-1).astype(np.int16)
    rgb += np.random.default_rng(seed).integers(-6, 7, rgb.shape, dtype=np.int16)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def parse_cameras(spec: str) -> list[tuple[str, int, int]]:
    """"default:1920x1080,small:640x480" -> [(name, width, height), ...]."""
    cameras = []
    for item in spec.split(","):
        name, size = item.split(":")
        width, height = (int(v) for v in size.split("x"))
        cameras.append((name, width, height))
    return cameras


def prefix(camera: str) -> str:
    return "" if camera == "default" else f"{camera}/"


class Status:
    def __init__(self, path: str):
        self.path = Path(path)
        self.counts: dict[str, int] = {}
        self._last = 0.0

    def bump(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def write(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= 0.5:
            self._last = now
            write_status(self.path, self.counts)

    def write_on_signal(self) -> None:
        """Write only when the parent sends SIGUSR1 (no periodic file writes inside a measured process)."""
        self.seq = 0

        def handler(*_):
            self.seq += 1
            write_status(self.path, {**self.counts, "seq": self.seq})
        signal.signal(signal.SIGUSR1, handler)


def write_status(path: Path, counts: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "time": time.time(), **counts}))
    tmp.replace(path)


def run_publisher(args) -> None:
    """Camera drivers: the harness's FakeCamera, one per camera (each spins on its own thread)."""
    from rclpy.utilities import get_default_context

    from spatialthinker_ros.testing.fake_cameras import FakeCamera

    status = Status(args.status)
    cameras = {}
    for name, width, height in parse_cameras(args.cameras):
        depth_m = k = None
        if args.depth:
            # depth registered to the colour image, at the colour size or a smaller one of the same aspect
            dw, dh = (int(v) for v in args.depth_size.split("x")) if args.depth_size else (width, height)
            depth_m = np.full((dh, dw), 2.0, np.float32)      # 2 m everywhere, sent in millimetres
            f = 600.0 * dw / width
            k = [f, 0.0, dw / 2, 0.0, f, dh / 2, 0.0, 0.0, 1.0]
        camera = FakeCamera(get_default_context(), prefix=prefix(name), rate_hz=args.rate,
                            compressed=args.compressed, jpeg_quality=JPEG_QUALITY, depth_m=depth_m,
                            depth_encoding="16UC1", k=k, rgb=camera_image(width, height))
        cameras[name] = camera
        if args.compressed:
            status.counts[f"{name}_jpeg_bytes"] = camera.colour_bytes
    try:
        while True:
            for name, camera in cameras.items():
                status.counts[f"{name}_published"] = len(camera.published_stamps)
            status.write(force=True)
            time.sleep(0.5)   # the cameras publish on their own threads; this one only reports
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        status.write(force=True)
        for camera in cameras.values():
            camera.close()
        rclpy.try_shutdown()


def run_subscriber(args) -> None:
    """The reference: what receiving the stream costs a bare rclpy process with the node's subscriptions."""
    node = Node(f"bench_subscriber_{os.getpid()}")
    status = Status(args.status)
    status.write_on_signal()
    latest = {}
    convert = eager_conversion() if args.convert else lambda msg: msg

    def keep(key: str):
        def callback(msg) -> None:
            latest[key] = convert(msg)  # keep a reference (or the converted frame), as the node's cameras do
            status.counts[key] = status.counts.get(key, 0) + 1
        return callback

    for name, _, _ in parse_cameras(args.cameras):
        if args.compressed:
            node.create_subscription(CompressedImage, f"{prefix(name)}image/compressed", keep(f"{name}_colour"),
                                     CAMERA_QOS)
        else:
            node.create_subscription(Image, f"{prefix(name)}image", keep(f"{name}_colour"), CAMERA_QOS)
        if args.depth:
            node.create_subscription(Image, f"{prefix(name)}depth", keep(f"{name}_depth"), CAMERA_QOS)
            node.create_subscription(CameraInfo, f"{prefix(name)}camera_info", keep(f"{name}_info"), CAMERA_QOS)
    spin(node, status, MultiThreadedExecutor() if args.executor == "multi" else SingleThreadedExecutor())


def eager_conversion():
    """What a node converting every frame on arrival would do, with the product's own conversions."""
    from spatialthinker_ros.ros.conversions import compressed_to_rgb, depth_image, image_to_rgb

    limit = 4096 * 4096

    def convert(msg):
        if isinstance(msg, CompressedImage):
            return compressed_to_rgb(msg, limit)
        if isinstance(msg, Image):
            return depth_image(msg, 0.001, limit).metres() if msg.encoding == "16UC1" else image_to_rgb(msg, limit)
        return msg
    return convert


def run_floor(args) -> None:
    """A bare AskSpatial server (the same service type and request bytes as the node, answered empty at once)
    and an Image echo over topics (ping -> pong, reliable)."""
    from spatialthinker_ros.srv import AskSpatial

    node = Node("bench_floor")
    status = Status(args.status)

    def answer(request, response):
        status.bump("asked")
        return response

    node.create_service(AskSpatial, "/bench_floor/ask", answer, qos_profile=QoSProfile(depth=100))
    reliable = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
    pong = node.create_publisher(Image, "/bench_echo/pong", reliable)

    def echo(msg: Image) -> None:
        status.bump("echoed")
        pong.publish(msg)

    node.create_subscription(Image, "/bench_echo/ping", echo, reliable)
    status.write(force=True)
    spin(node, status)


def spin(node: Node, status: Status, executor=None) -> None:
    executor = executor or SingleThreadedExecutor()
    executor.add_node(node)
    status.write(force=True)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        status.write(force=True)
        executor.shutdown(timeout_sec=2.0)
        node.destroy_node()
        rclpy.try_shutdown()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=("publisher", "subscriber", "floor"))
    parser.add_argument("--status", required=True, help="JSON status file written about once a second")
    parser.add_argument("--cameras", default="default:1920x1080", help="name:WIDTHxHEIGHT[,name:WxH...]")
    parser.add_argument("--rate", type=float, default=30.0)
    parser.add_argument("--compressed", action="store_true", help="JPEG colour on <cam>/image/compressed")
    parser.add_argument("--depth-size", help="WIDTHxHEIGHT of depth + CameraInfo (default: the colour size)")
    parser.add_argument("--no-depth", dest="depth", action="store_false", help="no depth or CameraInfo")
    parser.add_argument("--convert", action="store_true", help="subscriber: convert every frame on arrival")
    parser.add_argument("--executor", choices=("single", "multi"), default="single", help="subscriber's executor")
    args = parser.parse_args(argv)
    if os.environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE") != "LOCALHOST":
        sys.exit("refusing to run without ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST (start it from a bench script)")
    stop_on_sigterm()
    rclpy.init()
    {"publisher": run_publisher, "subscriber": run_subscriber, "floor": run_floor}[args.role](args)


if __name__ == "__main__":
    main()
