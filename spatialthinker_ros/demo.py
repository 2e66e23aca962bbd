"""Offline demo: the real spatialthinker_node process answering questions about a bundled tabletop scene.

    python -m spatialthinker_ros.demo [--model M] [--device D] [--output DIR] [--backend all|transformers|replay]
    make demo                                               # the same, from the repository
    make demo MODEL=OX-PIXL/SpatialThinker-7B DEVICE=cuda   # the real model

Part 1 runs the node with the transformers backend. With no --model that is a tiny, randomly initialised
Qwen2.5-VL built here in seconds: it proves the whole path (model load, image, prompt, generation, parsing,
service, action, depth) works on this machine, but its answers are noise. Part 2 runs the node with the replay
backend on a recorded, well-formed SpatialThinker answer for the same image, so the scene graph, boxes and 3D
positions are meaningful without a GPU. Both parts stream the image, a registered depth image and CameraInfo
as a camera would, ask one question by the action (feedback printed as it arrives) and one by the service,
and save the answers drawn on the image in the output folder.

The demo isolates itself from any other ROS 2 graph (localhost discovery, a random domain, its own log
folder), stops each node it started by pid, bounds every wait, and exits non-zero, with the node's log tail,
when anything fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import cv2
import numpy as np

from spatialthinker_ros.launch_config import parameter_arguments

DATA_DIR = Path(__file__).resolve().parent / "data"
REAL_MODEL_COMMAND = "make demo MODEL=OX-PIXL/SpatialThinker-7B DEVICE=cuda"
CAMERA_RATE_HZ = 10.0
# The sample camera is static, so any depth frame within a few periods is registered with a colour frame. The
# node's default (0.05 s) pairs only the same stamp, which a loaded machine may not have received yet when the
# question arrives: the answer would then come without 3D.
CAMERA_PARAMS = dict(max_image_age=5.0, depth_sync_tolerance=2.5 / CAMERA_RATE_HZ)
TINY_MAX_NEW_TOKENS = 96
RULE = "=" * 100

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


class DemoFailure(Exception):
    """A step of the demo failed; the message says which and why."""


# ------------------------------------------------------------------------------------------------ setup
def isolate_ros() -> Path:
    """Keep the demo's graph to itself: must run before rclpy is imported; children inherit os.environ."""
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ["ROS_DOMAIN_ID"] = str(random.SystemRandom().randint(1, 100))
    os.environ.pop("ROS_LOCALHOST_ONLY", None)   # deprecated; conflicts with the discovery range when set
    log_dir = Path(tempfile.mkdtemp(prefix="spatialthinker-demo-roslog-"))
    os.environ["ROS_LOG_DIR"] = str(log_dir)
    profile = large_images_profile()
    if profile is not None:   # a profile the user chose wins
        os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(profile))
    return log_dir


def large_images_profile() -> Optional[Path]:
    """The shipped Fast DDS profile without which 640x480 frames stall for seconds on one machine (see the file)."""
    from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

    try:
        path = Path(get_package_share_directory("spatialthinker_ros")) / "config" / "fastdds_large_images.xml"
    except PackageNotFoundError:
        return None
    return path if path.is_file() else None


def default_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "spatialthinker_ros" / "tiny-qwen25vl"


def is_tiny_checkpoint(model: str) -> bool:
    from spatialthinker_ros.tiny_checkpoint import _MARKER

    return (Path(model).expanduser() / _MARKER).is_file()


@dataclass(frozen=True)
class Sample:
    """The bundled scene: colour, registered depth (mm), intrinsics and the questions its replay file answers."""

    rgb: np.ndarray
    depth_mm: np.ndarray
    camera: dict[str, Any]
    questions: list[dict[str, Any]]
    replay_file: Path

    @property
    def k(self) -> list[float]:
        c = self.camera
        return [c["fx"], 0.0, c["cx"], 0.0, c["fy"], c["cy"], 0.0, 0.0, 1.0]


def load_sample(data_dir: Path = DATA_DIR) -> Sample:
    meta_path = data_dir / "sample_scene.json"
    if not meta_path.is_file():
        raise DemoFailure(f"bundled sample data missing: {meta_path} (reinstall the package: make build)")
    meta = json.loads(meta_path.read_text())
    bgr = cv2.imread(str(data_dir / meta["image"]), cv2.IMREAD_COLOR)
    depth = cv2.imread(str(data_dir / meta["depth"]), cv2.IMREAD_UNCHANGED)
    if bgr is None or depth is None or depth.dtype != np.uint16:
        raise DemoFailure(f"bundled sample images in {data_dir} are missing or unreadable")
    return Sample(rgb=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), depth_mm=depth, camera=meta["camera"],
                  questions=meta["questions"], replay_file=data_dir / meta["replay_file"])


@dataclass
class Part:
    """One node run: which backend, its parameters, and how to label its output."""

    name: str          # file prefix in the output folder
    title: str
    params: dict[str, Any]
    note: str
    tiny: bool = False
    expect_meaningful: bool = False   # replay: the answer must be complete, with 3D for every object
    env: dict[str, str] = field(default_factory=dict)


def node_command(node_name: str, params: dict[str, Any]) -> list[str]:
    """The installed spatialthinker_node (next to this Python), else its module, with -p for each parameter."""
    executable = Path(sys.executable).parent / "spatialthinker_node"
    if executable.is_file():
        command = [str(executable)]
    elif shutil.which("spatialthinker_node"):
        command = [shutil.which("spatialthinker_node")]
    else:
        command = [sys.executable, "-m", "spatialthinker_ros.ros.node"]
    return command + ["--ros-args", "-r", f"__node:={node_name}", *parameter_arguments(params)]


class NodeProcess:
    """The node under demonstration; its output goes to a log file whose tail is shown on failure."""

    def __init__(self, command: list[str], log_path: Path, env: dict[str, str]):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        # Own session: a Ctrl-C in the terminal reaches only the demo, which then stops the node itself.
        self.popen = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)

    def exited(self) -> Optional[int]:
        return self.popen.poll()

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        """SIGINT by pid (the node shuts down cleanly), then SIGKILL if it does not exit in time."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=timeout)
        self._log.close()
        return self.popen.returncode


# ------------------------------------------------------------------------------------------------ ROS side
class Camera:
    """Publishes the sample as a driver would: rgb8 + 16UC1 depth (mm) + CameraInfo, same stamp, at 10 Hz.

    It spins its own executor on a thread so frames keep flowing while the main thread waits for answers.
    """

    def __init__(self, context: Any, sample: Sample, rate_hz: float = CAMERA_RATE_HZ):
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import CameraInfo, Image

        self._Image, self._CameraInfo = Image, CameraInfo
        self.node = Node("demo_camera", context=context)
        height, width = sample.rgb.shape[:2]
        self._size = (width, height)
        self._frame_id = sample.camera["frame_id"]
        self._rgb = np.ascontiguousarray(sample.rgb).tobytes()
        self._depth = np.ascontiguousarray(sample.depth_mm.astype("<u2")).tobytes()
        self._depth_size = sample.depth_mm.shape[1], sample.depth_mm.shape[0]
        self._k = sample.k
        self._sent = 0
        qos = qos_profile_sensor_data      # best effort, as camera drivers publish
        self.image_pub = self.node.create_publisher(Image, "image", qos)
        self.depth_pub = self.node.create_publisher(Image, "depth", qos)
        self.info_pub = self.node.create_publisher(CameraInfo, "camera_info", qos)
        self.node.create_timer(1.0 / rate_hz, self._publish)
        self._executor = SingleThreadedExecutor(context=context)
        self._executor.add_node(self.node)
        self._thread = threading.Thread(target=self._executor.spin, name="demo-camera", daemon=True)
        self._thread.start()

    def _publish(self) -> None:
        """Depth and CameraInfo go out before the colour frame of the same stamp, as they pair in the node."""
        from std_msgs.msg import Header

        self._sent = self._sent + 1 if self.subscribed() else 0
        header = Header(stamp=self.node.get_clock().now().to_msg(), frame_id=self._frame_id)
        depth_w, depth_h = self._depth_size
        self.depth_pub.publish(self._Image(header=header, width=depth_w, height=depth_h, encoding="16UC1",
                                           step=depth_w * 2, data=self._depth))
        p = [self._k[0], 0.0, self._k[2], 0.0, 0.0, self._k[4], self._k[5], 0.0, 0.0, 0.0, 1.0, 0.0]
        self.info_pub.publish(self._CameraInfo(
            header=header, width=depth_w, height=depth_h, distortion_model="plumb_bob", d=[0.0] * 5, k=self._k,
            r=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0], p=p))
        width, height = self._size
        self.image_pub.publish(self._Image(header=header, width=width, height=height, encoding="rgb8",
                                           step=width * 3, data=self._rgb))

    def subscribed(self) -> bool:
        return all(p.get_subscription_count() > 0 for p in (self.image_pub, self.depth_pub, self.info_pub))

    @property
    def frames_to_subscribers(self) -> int:
        """Frames published since restart_count() while image, depth and camera_info all had a subscriber."""
        return self._sent

    def restart_count(self) -> None:
        self._sent = 0

    def wait_unsubscribed(self, timeout: float) -> bool:
        """After a node stopped: until discovery notices, its subscriptions would pass for the next node's."""
        deadline = time.monotonic() + timeout
        while any(p.get_subscription_count() for p in (self.image_pub, self.depth_pub, self.info_pub)):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def close(self) -> None:
        self._executor.shutdown(timeout_sec=2.0)
        self._thread.join(timeout=5.0)
        self.node.destroy_node()


class Client:
    """Service and action clients for one node, spun on the caller's thread with deadlines."""

    def __init__(self, context: Any, node_name: str, process: NodeProcess):
        from rclpy.action import ActionClient
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node

        from spatialthinker_ros.action import AskSpatial as AskSpatialAction
        from spatialthinker_ros.srv import AskSpatial

        self.Action, self.Service = AskSpatialAction, AskSpatial
        self.process = process
        self.node = Node(f"demo_client_{node_name}", context=context)
        self.service = self.node.create_client(AskSpatial, f"/{node_name}/ask")
        self.action = ActionClient(self.node, AskSpatialAction, f"/{node_name}/ask_action")
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)

    def spin_until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        from spatialthinker_ros.ros.replies import REPLY_LOST, dropped_reply_lines

        deadline = time.monotonic() + timeout
        next_log_check = time.monotonic()
        while not done():
            code = self.process.exited()
            if code is not None:
                raise DemoFailure(f"the node exited (code {code}) while the demo waited for {what}")
            if time.monotonic() >= next_log_check:   # the node says when a reply will never arrive
                next_log_check = time.monotonic() + 0.5
                lost = [line for line in dropped_reply_lines(self.process.log()) if REPLY_LOST in line]
                if lost:
                    raise DemoFailure(f"the node's reply was lost in transport while the demo waited for {what}: "
                                      f"{lost[-1]}")
            if time.monotonic() > deadline:
                raise DemoFailure(f"timed out after {timeout:.0f} s waiting for {what}")
            self.executor.spin_once(timeout_sec=0.05)

    def pause(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        self.spin_until(lambda: time.monotonic() >= end, seconds + 1, "a pause")

    def wait_ready(self, camera: Camera, timeout: float) -> None:
        self.spin_until(self.service.service_is_ready, timeout, "the node's ~/ask service")
        self.spin_until(self.action.server_is_ready, timeout, "the node's ~/ask_action server")
        # A few frames of each after all three subscriptions matched, so the first question already has depth.
        camera.restart_count()
        self.spin_until(lambda: camera.frames_to_subscribers >= 3, timeout,
                        "the node to subscribe to image, depth and camera_info")

    def ask_action(self, question: str, options: Sequence[str], timeout: float,
                   on_feedback: Callable[[Any], None]) -> Any:
        """The action's result; retried while the node has not yet received a camera frame."""
        deadline = time.monotonic() + timeout
        while True:
            goal = self.Action.Goal(question=question, options=list(options))
            sending = self.action.send_goal_async(goal, feedback_callback=lambda m: on_feedback(m.feedback))
            self.spin_until(sending.done, max(1.0, deadline - time.monotonic()), "the goal to be accepted")
            handle = sending.result()
            if not handle.accepted:
                raise DemoFailure("the node rejected the action goal")
            getting = handle.get_result_async()
            self.spin_until(getting.done, max(1.0, deadline - time.monotonic()), "the action's result")
            result = getting.result().result
            if self._retry(result, deadline):
                continue
            return result

    def ask_service(self, question: str, options: Sequence[str], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            calling = self.service.call_async(self.Service.Request(question=question, options=list(options)))
            self.spin_until(calling.done, max(1.0, deadline - time.monotonic()), "the service's response")
            response = calling.result()
            if self._retry(response, deadline):
                continue
            return response

    def _retry(self, outcome: Any, deadline: float) -> bool:
        """Best-effort frames may take a moment to arrive after discovery: ERROR_NO_IMAGE means ask again."""
        if outcome.success or outcome.error_code != self.Service.Response.ERROR_NO_IMAGE:
            return False
        if time.monotonic() > deadline:
            return False
        self.pause(0.3)
        return True

    def close(self) -> None:
        self.action.destroy()
        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()


# ------------------------------------------------------------------------------------------------ output
def stage_name(action: Any, stage: int) -> str:
    names = {action.Feedback.STAGE_QUEUED: "queued", action.Feedback.STAGE_GENERATING: "generating",
             action.Feedback.STAGE_SCENE_READY: "scene ready"}
    return names.get(stage, f"stage {stage}")


def scene_from_msg(graph: Any) -> Any:
    """The core SceneGraph of a SceneGraph message, to draw it with core.annotate (the node's own drawing)."""
    from spatialthinker_ros.core.types import Box, Position3D, SceneGraph, SceneObject, SceneRelation

    objects = []
    for o in graph.objects:
        position = None
        if o.has_position:
            position = Position3D(o.position.x, o.position.y, o.position.z, o.size.x, o.size.y, o.size.z)
        objects.append(SceneObject(id=o.id, label=o.label, box=Box(o.x_min, o.y_min, o.x_max, o.y_max),
                                   position=position))
    relations = tuple(SceneRelation(r.subject, r.predicate, r.object) for r in graph.relations)
    return SceneGraph(objects=tuple(objects), relations=relations, image_size=(graph.image_width, graph.image_height))


def save_annotated(path: Path, rgb: np.ndarray, answer: Any) -> None:
    from spatialthinker_ros.core.annotate import draw_scene

    caption = answer.answer or STATUS_NAMES.get(answer.status, "no answer").lower()
    canvas = draw_scene(rgb, scene_from_msg(answer.scene_graph), caption)
    if not cv2.imwrite(str(path), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR)):
        raise DemoFailure(f"could not write {path}")


STATUS_NAMES = {0: "COMPLETE", 1: "PARTIAL", 2: "NO_ANSWER"}


def answer_dict(answer: Any, how: str, round_trip: float) -> dict[str, Any]:
    objects = []
    for o in answer.scene_graph.objects:
        entry = {"id": o.id, "label": o.label, "box": [round(v, 1) for v in (o.x_min, o.y_min, o.x_max, o.y_max)]}
        if o.has_position:
            entry["position_m"] = [round(v, 3) for v in (o.position.x, o.position.y, o.position.z)]
            entry["size_m"] = [round(v, 3) for v in (o.size.x, o.size.y, o.size.z)]
        objects.append(entry)
    return {
        "asked_by": how,
        "question": answer.question,
        "options": list(answer.options),
        "answer": answer.answer,
        "choice": answer.choice,
        "status": STATUS_NAMES.get(answer.status, str(answer.status)),
        "status_message": answer.status_message,
        "observation": answer.observation,
        "reasoning": answer.reasoning,
        "objects": objects,
        "relations": [[r.subject, r.predicate, r.object] for r in answer.scene_graph.relations],
        "image_size": [answer.scene_graph.image_width, answer.scene_graph.image_height],
        "frame_id": answer.header.frame_id,
        "model": answer.model,
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "inference_s": round(answer.inference_time.sec + answer.inference_time.nanosec * 1e-9, 3),
        "round_trip_s": round(round_trip, 3),
        "raw_response": answer.raw_response,
    }


def _wrap(label: str, text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return textwrap.fill(text, width=100, initial_indent=f"    {label:<12}", subsequent_indent=" " * 16)


def print_answer(summary: dict[str, Any], image_path: Path, tiny: bool) -> None:
    options = " ".join(f"({chr(65 + i)}) {o}" for i, o in enumerate(summary["options"]))
    print(f"  Q [{summary['asked_by']}]: {summary['question']}" + (f"  {options}" if options else ""))
    choice = f"   choice {summary['choice']}" if summary["choice"] else ""
    print(f"    answer      {summary['answer'] or '(none)'}{choice}   status {summary['status']}")
    if summary["status_message"]:
        print(_wrap("problems", summary["status_message"], 300))
    if summary["observation"]:
        print(_wrap("observation", summary["observation"]))
    if summary["reasoning"]:
        print(_wrap("reasoning", summary["reasoning"]))
    if tiny:
        print(f"    raw output  {summary['raw_response'][:120]!r}{'...' if len(summary['raw_response']) > 120 else ''}")
    width, height = summary["image_size"]
    if summary["objects"]:
        print(f"    objects     boxes in {width}x{height} image pixels; 3D centre and size in metres, "
              f"frame {summary['frame_id']}")
        for o in summary["objects"]:
            box = ", ".join(f"{v:.0f}" for v in o["box"])
            line = f"      {o['id']:<14} box [{box}]"
            if "position_m" in o:
                x, y, z = o["position_m"]
                sx, sy, sz = o["size_m"]
                line = f"{line:<48} centre ({x:+.2f}, {y:+.2f}, {z:.2f})  size {sx:.2f} x {sy:.2f} x {sz:.2f}"
            else:
                line += "  (no 3D position)"
            print(line)
    else:
        print("    objects     (none)")
    for subject, predicate, obj in summary["relations"]:
        print(f"    relation    {subject} --{predicate}--> {obj}")
    print(f"    tokens      {summary['prompt_tokens']} prompt + {summary['completion_tokens']} generated;  "
          f"model time {summary['inference_s']:.2f} s, round trip {summary['round_trip_s']:.2f} s;  "
          f"model {summary['model']}")
    print(f"    image       {image_path}")


def banner(lines: Sequence[str]) -> None:
    print(RULE)
    for line in lines:
        print(f" {line}")
    print(RULE, flush=True)


def disclaimer(model_label: str, tiny: bool, parts: Sequence[Part]) -> list[str]:
    lines = []
    names = {p.name for p in parts}
    if "tiny_model" in names:
        lines += ["Part 'tiny_model' runs a TINY, RANDOMLY INITIALISED Qwen2.5-VL built on this machine: it runs",
                  "exactly the real model's code path, but ITS ANSWERS ARE NOISE. It proves the plumbing, not "
                  "the model."]
    elif any(p.params.get("backend") == "transformers" for p in parts):
        lines += [f"Part 'model' runs {model_label}."]
    if "replay" in names:
        lines += ["Part 'replay' answers from a RECORDED, well-formed SpatialThinker response for the bundled image",
                  "(not computed live): the node still parses it, maps the boxes and lifts them to 3D from depth."]
    if tiny or "tiny_model" in names or not any(p.params.get("backend") == "transformers" for p in parts):
        lines += [f"Real model (GPU with ~17 GB, weights from the hub): {REAL_MODEL_COMMAND}"]
    return lines


# ------------------------------------------------------------------------------------------------ run
def run_part(part: Part, context: Any, camera: Camera, sample: Sample, output: Path, timeout: float,
             questions: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    node_name = f"spatialthinker_{part.name}"
    print(f"\n--- {part.title} " + "-" * max(0, len(RULE) - len(part.title) - 5))
    print(f"  {part.note}")
    command = node_command(node_name, part.params)
    log_path = output / f"{part.name}_node.log"
    print(f"  starting the node: {' '.join(command[:1])} ... (log: {log_path})", flush=True)
    process = NodeProcess(command, log_path, os.environ | part.env)
    client = Client(context, node_name, process)
    summaries = []
    try:
        started = time.monotonic()
        client.wait_ready(camera, timeout)
        print(f"  node ready in {time.monotonic() - started:.1f} s: /{node_name}/ask and /{node_name}/ask_action",
              flush=True)
        for index, (how, q) in enumerate(zip(("action", "service"), questions)):
            asked = time.monotonic()
            if how == "action":
                print(f"  asking by action: {q['question']!r}", flush=True)

                def on_feedback(feedback: Any) -> None:
                    stage = stage_name(client.Action, feedback.stage)
                    extra = f", {feedback.tokens_generated} tokens" if feedback.tokens_generated else ""
                    if feedback.stage == client.Action.Feedback.STAGE_SCENE_READY and feedback.scene_graph.objects:
                        ids = ", ".join(o.id for o in feedback.scene_graph.objects)
                        extra += f"; scene graph already available: {ids}"
                    print(f"    feedback: {stage}{extra}  (+{time.monotonic() - asked:.2f} s)", flush=True)

                outcome = client.ask_action(q["question"], q["options"], timeout, on_feedback)
            else:
                print(f"  asking by service: {q['question']!r}", flush=True)
                outcome = client.ask_service(q["question"], q["options"], timeout)
            round_trip = time.monotonic() - asked
            if not outcome.success:
                raise DemoFailure(f"the {how} request failed: error {outcome.error_code}: {outcome.message}")
            summary = answer_dict(outcome.answer, how, round_trip)
            image_path = output / f"{part.name}_{how}.png"
            save_annotated(image_path, sample.rgb, outcome.answer)
            summary["annotated_image"] = str(image_path)
            print()
            print_answer(summary, image_path, part.tiny)
            print(flush=True)
            if part.expect_meaningful:
                check_meaningful(summary, q)
            summaries.append(summary)
        (output / f"{part.name}_answers.json").write_text(json.dumps(summaries, indent=2) + "\n")
        return summaries
    except DemoFailure as exc:
        raise DemoFailure(f"{part.title}: {exc}\n--- last lines of the node's log ({log_path}) ---\n"
                          f"{process.tail()}") from None
    finally:
        client.close()
        code = process.stop()
        if code not in (0, None, -signal.SIGINT):
            print(f"  note: the node exited with code {code} (log: {log_path})")
        camera.wait_unsubscribed(timeout=10.0)


def check_meaningful(summary: dict[str, Any], question: dict[str, Any]) -> None:
    """The replay part must show what the node does with a good answer; anything less is a bug worth failing on."""
    if summary["status"] != "COMPLETE" or summary["answer"] != question["answer"]:
        raise DemoFailure(f"the recorded answer came back as {summary['status']} {summary['answer']!r} "
                          f"({summary['status_message']})")
    if not summary["objects"] or any("position_m" not in o for o in summary["objects"]):
        raise DemoFailure("the recorded answer's objects did not all get 3D positions from the depth image")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m spatialthinker_ros.demo",
        description="Run spatialthinker_node offline on a bundled tabletop image: a live model (by default a "
                    "tiny random one whose answers are noise), then a recorded SpatialThinker answer.",
        epilog=f"Real model: {REAL_MODEL_COMMAND}  (or --model OX-PIXL/SpatialThinker-7B --device cuda)",
    )
    parser.add_argument("--model", help="hub id or checkpoint directory for the live part (default: the tiny "
                                        "random checkpoint, built once into --cache-dir)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default %(default)s)")
    parser.add_argument("--output", type=Path, default=Path("demo_output"),
                        help="folder for annotated images, answers and node logs (default %(default)s)")
    parser.add_argument("--backend", choices=("all", "transformers", "replay"), default="all",
                        help="all: the live model, then the recorded answer (default); or only one of them")
    parser.add_argument("--max-new-tokens", type=int,
                        help=f"generation limit of the live part (default {TINY_MAX_NEW_TOKENS} for the tiny model, "
                             "2048 otherwise)")
    parser.add_argument("--timeout", type=float,
                        help="seconds to wait for the node to start and for each answer (default 120; 1800 for a "
                             "model that may still have to be downloaded)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"where the tiny checkpoint is built and reused (default {default_cache_dir()})")
    args = parser.parse_args(argv)
    if args.max_new_tokens is not None and args.max_new_tokens < 16:
        parser.error("--max-new-tokens must be at least 16 (the node's lower limit)")
    if args.timeout is not None and not args.timeout > 0:
        parser.error("--timeout must be positive")
    return args


def plan(args: argparse.Namespace, sample: Sample) -> tuple[list[Part], str, bool]:
    """The parts to run, the live model's label, and whether that model is the tiny random one."""
    parts = []
    model, tiny = args.model, args.model is None or is_tiny_checkpoint(args.model)
    label = model or "the tiny random checkpoint"
    if args.backend in ("all", "transformers"):
        env = {}
        if model is None:
            cache = args.cache_dir or default_cache_dir()
            print(f"tiny checkpoint: {cache} (built on first use, then reused)", flush=True)
            from transformers.utils import logging as transformers_logging

            from spatialthinker_ros.tiny_checkpoint import build_tiny_checkpoint

            transformers_logging.disable_progress_bar()     # a 2 MB save needs no progress bar
            model = str(build_tiny_checkpoint(cache))
        if tiny:
            env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        max_new_tokens = args.max_new_tokens or (TINY_MAX_NEW_TOKENS if tiny else 2048)
        params = dict(backend="transformers", model=model, device=args.device, max_new_tokens=max_new_tokens,
                      **CAMERA_PARAMS)
        name = "tiny_model" if tiny else "model"
        title = ("Part 1: TINY RANDOM MODEL (answers are noise)" if tiny
                 else f"Part 1: {model} on {args.device}")
        note = ("transformers backend on a ~0.5 M-parameter random Qwen2.5-VL: the real code path, noise answers."
                if tiny else f"transformers backend, model {model}, device {args.device}.")
        parts.append(Part(name, title, params, note, tiny=tiny, env=env))
    if args.backend in ("all", "replay"):
        params = dict(backend="replay", replay_file=str(sample.replay_file), **CAMERA_PARAMS)
        parts.append(Part("replay", "Part 2: RECORDED SPATIALTHINKER ANSWER (replay backend)", params,
                          f"replay backend on {sample.replay_file.name}: the node parses a recorded answer, maps its "
                          "boxes and lifts them to 3D with the streamed depth.", expect_meaningful=True))
    return parts, label, tiny


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    log_dir = isolate_ros()
    context = camera = None
    failure: Optional[str] = None
    parts: list[Part] = []
    label, tiny = "", True
    written: list[str] = []
    try:
        sample = load_sample()
        args.output.mkdir(parents=True, exist_ok=True)
        parts, label, tiny = plan(args, sample)
        timeout = args.timeout or (120.0 if tiny else 1800.0)
        banner(["spatialthinker_ros demo: the real spatialthinker_node, offline, on a bundled tabletop image",
                *disclaimer(label, tiny, parts)])
        import rclpy

        context = rclpy.Context()
        rclpy.init(context=context)
        camera = Camera(context, sample)
        print(f"camera: streaming {sample.rgb.shape[1]}x{sample.rgb.shape[0]} rgb8 + 16UC1 depth + CameraInfo at "
              f"{CAMERA_RATE_HZ:.0f} Hz on /image, /depth, /camera_info (ROS_DOMAIN_ID {os.environ['ROS_DOMAIN_ID']}, "
              "localhost only)", flush=True)
        for part in parts:
            written += [s["annotated_image"] for s in
                        run_part(part, context, camera, sample, args.output, timeout, sample.questions)]
    except DemoFailure as exc:
        failure = str(exc)
    except KeyboardInterrupt:
        failure = "interrupted"
    finally:
        if camera is not None:
            camera.close()
        if context is not None:
            context.try_shutdown()
        shutil.rmtree(log_dir, ignore_errors=True)
    if failure is not None:
        print(f"\nDEMO FAILED: {failure}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED if failure == "interrupted" else EXIT_FAILED
    banner([f"Done. Annotated images: {', '.join(written)}",
            f"Answers and node logs: {args.output}/*_answers.json, {args.output}/*_node.log",
            *disclaimer(label, tiny, parts)])
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
