"""Per-request overhead outside the model: ~/ask round trips with the replay backend, against bare ROS round trips.

    .venv/bin/python -m bench.request_overhead
    .venv/bin/python -m bench.request_overhead --requests 200 --sizes 1920x1080

For each frame size, a camera publisher streams colour (rgb8) + 16UC1 depth + CameraInfo of that size at --rate
while this process calls, in turn and interleaved (so machine noise hits all alike):

    node, camera frame   AskSpatial without an image: the node converts its latest frame and depth, answers, publishes
    node, request image  AskSpatial carrying the image (rgb8): the node converts it, answers, publishes
    floor, request image the same request to a bare rclpy AskSpatial server that answers at once (empty answer)
    floor, no image      the camera-frame request to the bare server: the service round trip itself
    echo                 the image to a bare node over a topic and back (reliable): a bare image round trip

The replay backend answers in microseconds, so node minus floor is the node's own cost per request. Then, in this
process, the node's per-request steps are timed one by one on the same frames (where the time goes).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time

import numpy as np

from spatialthinker_ros.testing.isolation import DDS_TRANSPORTS, isolate_ros, use_dds_transport
from spatialthinker_ros.testing.node_client import spin_until
from spatialthinker_ros.testing.processes import Processes, node_command

from bench._common import machine, summary_ms, table, write_results

SCRATCH = isolate_ros(prefix="spatialthinker-bench-")

from bench._rosbench import (OPTIONS, QUESTION, Asker, rclpy, role_args, wait_status,  # noqa: E402
                             write_replay_file)
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402

from spatialthinker_ros.srv import AskSpatial  # noqa: E402

KINDS = ("node_camera", "node_image", "floor_image", "floor_noimage", "echo")
CAMERAS = {"640x480": "small", "1920x1080": "large"}


def image_msg(width: int, height: int) -> Image:
    from bench._ros_roles import camera_image

    msg = Image(height=height, width=width, encoding="rgb8", step=width * 3)
    msg.data = camera_image(width, height).tobytes()
    msg.header.frame_id = "camera_color_optical_frame"
    return msg


class Echo:
    """Publishes an Image on /bench_echo/ping and waits for the floor process to send it back on /bench_echo/pong."""

    def __init__(self, asker: Asker):
        reliable = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
        self.asker = asker
        self.ping = asker.node.create_publisher(Image, "/bench_echo/ping", reliable)
        self.received = []
        asker.node.create_subscription(Image, "/bench_echo/pong", self.received.append, reliable)

    def round_trip(self, msg: Image, timeout: float = 10.0) -> float:
        self.received.clear()
        stamp = self.asker.node.get_clock().now().to_msg()
        msg.header.stamp = stamp
        started = time.perf_counter()
        self.ping.publish(msg)
        if not spin_until(self.asker.node, lambda: any(m.header.stamp == stamp for m in self.received), timeout):
            raise TimeoutError("no echo")
        return time.perf_counter() - started

    def wait_ready(self, msg: Image, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.round_trip(msg, timeout=1.0)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError("the echo never answered") from None


def measure_size(size: str, args, asker: Asker, echo: Echo, kids: Processes, node) -> dict:
    width, height = (int(v) for v in size.split("x"))
    camera = CAMERAS[size]
    status = SCRATCH / f"publisher-{size}.json"
    publisher = kids.start(role_args("publisher", status, cameras=f"{camera}:{size}", rate=args.rate),
                           f"publisher-{size}")
    try:
        wait_status(status, f"{camera}_published", publisher, timeout=30.0)
        asker.wait_ready(node, timeout=60.0, question=QUESTION, options=OPTIONS, camera=camera)
        picture = image_msg(width, height)
        requests = {
            "node_camera": ("/spatialthinker/ask", AskSpatial.Request(question=QUESTION, options=OPTIONS, camera=camera)),
            "node_image": ("/spatialthinker/ask", AskSpatial.Request(question=QUESTION, options=OPTIONS, image=picture)),
            "floor_image": ("/bench_floor/ask", AskSpatial.Request(question=QUESTION, options=OPTIONS, image=picture)),
            "floor_noimage": ("/bench_floor/ask", AskSpatial.Request(question=QUESTION, options=OPTIONS, camera=camera)),
        }
        echo.wait_ready(picture)
        times = {kind: [] for kind in KINDS}
        failures = []
        for i in range(args.warmup + args.requests):
            for kind in KINDS:
                if kind == "echo":
                    seconds = echo.round_trip(picture)
                else:
                    service, request = requests[kind]
                    response, seconds = asker.timed_call(request, service=service, timeout=30.0)
                    if kind.startswith("node") and not response.success:
                        failures.append(f"{kind}: {response.message}")
                if i >= args.warmup:
                    times[kind].append(seconds)
    finally:
        publisher.stop()
    result = {kind: summary_ms(values) for kind, values in times.items()}
    result["failures"] = failures[:5]
    result["failure_count"] = len(failures)
    result["breakdown_ms"] = breakdown(width, height, args.breakdown_repeats)
    return result


def breakdown(width: int, height: int, repeats: int) -> dict:
    """The node's per-request steps (node.py _answer), timed one by one in this process on frames of this size."""
    from rclpy.serialization import deserialize_message, serialize_message
    from std_msgs.msg import Header

    from spatialthinker_ros.core.backends.replay_backend import ReplayBackend, ReplayConfig
    from spatialthinker_ros.core.pipeline import PipelineConfig, finish_result, prepare_request
    from spatialthinker_ros.ros.conversions import (depth_image, image_to_rgb, intrinsics_from_camera_info,
                                                    spatial_answer_msg)
    from spatialthinker_ros.ros.visualization import scene_markers

    colour = image_msg(width, height)
    depth = Image(height=height, width=width, encoding="16UC1", step=width * 2)
    depth.data = np.full((height, width), 2000, np.uint16).tobytes()
    info = CameraInfo(width=width, height=height, k=[600.0, 0, width / 2, 0, 600.0, height / 2, 0, 0, 1])
    backend = ReplayBackend(ReplayConfig(replay_file=str(SCRATCH / "replay.jsonl")))
    config = PipelineConfig()
    header = Header(frame_id="camera_color_optical_frame")
    limit = 4096 * 4096
    request_msg = AskSpatial.Request(question=QUESTION, options=OPTIONS, image=colour)
    request_bytes = serialize_message(request_msg)
    state = {}

    def convert_colour():
        state["rgb"] = image_to_rgb(colour, limit)

    def convert_depth():
        state["depth"] = depth_image(depth, 0.001, limit)
        state["k"] = intrinsics_from_camera_info(info)

    def prepare():
        state["request"] = prepare_request(state["rgb"], QUESTION, OPTIONS, config, request_id="x")

    def generate():
        state["inference"] = backend.generate([state["request"]])[0]

    def finish():
        state["result"] = finish_result(state["request"], state["inference"], OPTIONS, camera_size=(width, height),
                                        depth=state["depth"], intrinsics=state["k"], config=config)

    def answer_msg():
        state["answer"] = spatial_answer_msg(state["result"], header, "x", "cam", QUESTION, OPTIONS)

    def markers():
        scene_markers(state["result"].parsed.scene, header, 5.0)

    def response_bytes():
        serialize_message(AskSpatial.Response(success=True, answer=state["answer"]))

    def request_from_bytes():
        deserialize_message(request_bytes, AskSpatial.Request)

    steps = {"colour Image -> RGB": convert_colour, "depth + CameraInfo (a view)": convert_depth,
             "prepare_request (prompt, resize)": prepare, "replay backend": generate,
             "finish_result (parse, boxes, 3D)": finish, "SpatialAnswer message": answer_msg,
             "MarkerArray": markers, "serialize the response": response_bytes,
             "(image requests) 6 MB-class request -> Python": request_from_bytes}
    timings = {}
    for name, step in steps.items():
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            step()
            samples.append(time.perf_counter() - started)
        timings[name] = statistics.median(samples) * 1000.0
    return timings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="640x480,1920x1080", help=f"comma list of {', '.join(CAMERAS)}")
    parser.add_argument("--requests", type=int, default=100, help="measured requests per kind and size")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rate", type=float, default=30.0, help="camera frame rate while requests run")
    parser.add_argument("--breakdown-repeats", type=int, default=30)
    parser.add_argument("--dds-transport", default="shm_large", choices=DDS_TRANSPORTS,
                        help="see idle_cpu.py; shm_large delivers 1080p frames, the stock transport mostly does not")
    parser.add_argument("--json", help="result file (default bench/results/request_overhead.json)")
    args = parser.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    if set(sizes) - set(CAMERAS):
        parser.error(f"sizes must be among {', '.join(CAMERAS)}")

    use_dds_transport(args.dds_transport)
    replay = write_replay_file(SCRATCH)
    rclpy.init()
    asker = Asker()
    echo = Echo(asker)
    results = {}
    try:
        with Processes(SCRATCH) as kids:
            floor_status = SCRATCH / "floor.json"
            floor = kids.start(role_args("floor", floor_status), "floor")
            node = kids.start(node_command(backend="replay", replay_file=str(replay), cameras=list(CAMERAS.values()),
                                        use_depth=True), "node")
            wait_status(floor_status, "pid", floor, timeout=30.0)
            if not spin_until(asker.node, asker.other("/bench_floor/ask").service_is_ready, 30.0):
                raise TimeoutError("the floor service never appeared")
            for size in sizes:
                print(f"[request_overhead] {size}: {args.requests} requests of each kind ...", file=sys.stderr,
                      flush=True)
                results[size] = measure_size(size, args, asker, echo, kids, node)
    finally:
        asker.close()
        rclpy.try_shutdown()
        shutil.rmtree(SCRATCH, ignore_errors=True)

    print(f"\nrequest overhead, {machine()}, {args.requests} sequential requests per kind, camera at {args.rate:g} Hz")
    rows = []
    for size, r in results.items():
        for kind in KINDS:
            rows.append([size, kind, f"{r[kind]['p50_ms']:.2f}", f"{r[kind]['p95_ms']:.2f}"])
        r["overhead_camera_p50_ms"] = r["node_camera"]["p50_ms"] - r["floor_noimage"]["p50_ms"]
        r["overhead_image_p50_ms"] = r["node_image"]["p50_ms"] - r["floor_image"]["p50_ms"]
        r["ratio_camera_to_floor"] = r["node_camera"]["p50_ms"] / r["floor_noimage"]["p50_ms"]
        r["ratio_image_to_floor"] = r["node_image"]["p50_ms"] / r["floor_image"]["p50_ms"]
        r["ratio_image_to_echo"] = r["node_image"]["p50_ms"] / r["echo"]["p50_ms"]
        r["ratio_camera_to_echo"] = r["node_camera"]["p50_ms"] / r["echo"]["p50_ms"]
    print(table(rows, ["size", "kind", "p50 ms", "p95 ms"]))
    print()
    print(table([[size, f"{r['overhead_camera_p50_ms']:.2f}", f"{r['ratio_camera_to_floor']:.2f}x",
                  f"{r['ratio_camera_to_echo']:.2f}x", f"{r['overhead_image_p50_ms']:.2f}",
                  f"{r['ratio_image_to_floor']:.2f}x", f"{r['ratio_image_to_echo']:.2f}x", r["failure_count"]]
                 for size, r in results.items()],
                ["size", "camera: node-floor ms", "node/floor", "node/echo", "image: node-floor ms", "node/floor",
                 "node/echo", "failed"]))
    for size, r in results.items():
        print(f"\nwhere the node's time goes per request, {size} (median of {args.breakdown_repeats}, ms):")
        print(table([[name, f"{ms:.3f}"] for name, ms in r["breakdown_ms"].items()], ["step", "ms"]))
    path = write_results("request_overhead", {"args": vars(args), "sizes": results}, args.json)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
