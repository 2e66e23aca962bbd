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
import shutil
import signal
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import cv2
import numpy as np

from spatialthinker_ros.cli import DATA_DIR
from spatialthinker_ros.core.parsing import scene_text_complete
from spatialthinker_ros.testing.fake_cameras import FakeCamera
from spatialthinker_ros.testing.isolation import isolate_ros
from spatialthinker_ros.testing.node_client import NodeClient
from spatialthinker_ros.testing.processes import Process, WaitFailed, node_command, wait_for

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
def default_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "spatialthinker_ros" / "tiny-qwen25vl"


def is_tiny_checkpoint(model: str) -> bool:
    from spatialthinker_ros.tiny_checkpoint import COMPLETE_MARKER

    return (Path(model).expanduser() / COMPLETE_MARKER).is_file()


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


def sample_camera(context: Any, sample: Sample) -> FakeCamera:
    """The sample as a driver streams it: rgb8 + 16UC1 depth (mm) + CameraInfo, one stamp per frame, at 10 Hz."""
    return FakeCamera(context, rgb=sample.rgb, rate_hz=CAMERA_RATE_HZ, frame_id=sample.camera["frame_id"],
                      depth_m=sample.depth_mm / 1000.0, depth_encoding="16UC1", k=sample.k)


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


# ------------------------------------------------------------------------------------------------ output
def stage_name(action: Any, stage: int) -> str:
    names = {action.Feedback.STAGE_QUEUED: "queued", action.Feedback.STAGE_GENERATING: "generating",
             action.Feedback.STAGE_SCENE_READY: "scene ready"}
    return names.get(stage, f"stage {stage}")


def save_annotated(path: Path, rgb: np.ndarray, answer: Any) -> None:
    from spatialthinker_ros.core.annotate import draw_scene
    from spatialthinker_ros.ros.conversions import scene_graph_from_msg

    caption = answer.answer or answer_status(answer)
    canvas = draw_scene(rgb, scene_graph_from_msg(answer.scene_graph), caption)
    if not cv2.imwrite(str(path), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR)):
        raise DemoFailure(f"could not write {path}")


def answer_status(answer: Any) -> str:
    from spatialthinker_ros.core.types import AnswerStatus

    return AnswerStatus(answer.status).name.lower()


def summarize(answer: Any, how: str, round_trip: float) -> dict[str, Any]:
    """The core's answer_dict (what spatialthinker-ask prints), with how it was asked and the round trip."""
    from spatialthinker_ros.core.pipeline import answer_dict
    from spatialthinker_ros.ros.conversions import answer_from_msg

    parsed, inference = answer_from_msg(answer)
    return {"asked_by": how, **answer_dict(parsed, inference, answer.question, answer.options),
            "frame_id": answer.header.frame_id, "round_trip_s": round(round_trip, 3)}


def _wrap(label: str, text: str, limit: int = 400) -> str:
    from spatialthinker_ros.core.text import excerpt

    return textwrap.fill(excerpt(text, limit), width=100, initial_indent=f"    {label:<12}", subsequent_indent=" " * 16)


def print_answer(summary: dict[str, Any], image_path: Path, tiny: bool) -> None:
    from spatialthinker_ros.core.prompt import option_letter
    from spatialthinker_ros.core.text import excerpt

    options = " ".join(f"({option_letter(i)}) {o}" for i, o in enumerate(summary["options"]))
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
        print(f"    raw output  {excerpt(summary['raw_response'], 120)!r}")
    width, height = summary["image_size"]
    if summary["objects"]:
        print(f"    objects     boxes in {width}x{height} image pixels; 3D centre and size in metres, "
              f"frame {summary['frame_id']}")
        for o in summary["objects"]:
            box = ", ".join(f"{v:.0f}" for v in o["box"])
            line = f"      {o['id']:<14} box [{box}]"
            if o["position_m"] is not None:
                x, y, z = o["position_m"].values()
                sx, sy, sz = o["size_m"].values()
                line = f"{line:<48} centre ({x:+.2f}, {y:+.2f}, {z:.2f})  size {sx:.2f} x {sy:.2f} x {sz:.2f}"
            else:
                line += "  (no 3D position)"
            print(line)
    else:
        print("    objects     (none)")
    for r in summary["relations"]:
        print(f"    relation    {r['subject']} --{r['predicate']}--> {r['object']}   depth check: "
              f"{r['check'].replace('_', ' ')} ({r['check_note']})")
    print(f"    tokens      {summary['prompt_tokens']} prompt + {summary['completion_tokens']} generated;  "
          f"model time {summary['seconds']:.2f} s, round trip {summary['round_trip_s']:.2f} s;  "
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
        lines += [f"Real model (a GPU that holds the 7B model, weights from the hub): {REAL_MODEL_COMMAND}"]
    return lines


# ------------------------------------------------------------------------------------------------ run
def run_part(part: Part, context: Any, camera: FakeCamera, sample: Sample, output: Path, timeout: float,
             questions: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    node_name = f"spatialthinker_{part.name}"
    print(f"\n--- {part.title} " + "-" * max(0, len(RULE) - len(part.title) - 5))
    print(f"  {part.note}")
    command = node_command("-r", f"__node:={node_name}", **part.params)
    log_path = output / f"{part.name}_node.log"
    print(f"  starting the node: {' '.join(command[:1])} ... (log: {log_path})", flush=True)
    process = Process(command, log_path, os.environ | part.env, name=node_name)
    client = NodeClient(context, f"/{node_name}", process, node_name=f"demo_client_{node_name}", debug_image=False)
    summaries = []
    try:
        started = time.monotonic()
        client.wait_for_service(timeout=timeout)
        client.wait_for_action(timeout=timeout)
        # A few frames of each after all three subscriptions matched, so the first question already has depth.
        camera.restart_count()
        client.wait(lambda: camera.frames_to_subscribers >= 3, timeout,
                    "the node to subscribe to image, depth and camera_info")
        print(f"  node ready in {time.monotonic() - started:.1f} s: /{node_name}/ask and /{node_name}/ask_action",
              flush=True)
        for index, (how, q) in enumerate(zip(("action", "service"), questions)):
            asked = time.monotonic()
            print(f"  asking by {how}: {q['question']!r}", flush=True)

            stages: list[int] = []

            def on_feedback(feedback: Any, asked: float = asked, stages: list[int] = stages) -> None:
                stages.append(feedback.stage)
                stage = stage_name(client.Action, feedback.stage)
                extra = f", {feedback.tokens_generated} tokens" if feedback.tokens_generated else ""
                if feedback.stage == client.Action.Feedback.STAGE_SCENE_READY and feedback.scene_graph.objects:
                    ids = ", ".join(o.id for o in feedback.scene_graph.objects)
                    extra += f"; scene graph already available: {ids}"
                print(f"    feedback: {stage}{extra}  (+{time.monotonic() - asked:.2f} s)", flush=True)

            outcome = client.ask_until_ready(timeout=timeout, by_action=how == "action",
                                             on_feedback=on_feedback if how == "action" else None,
                                             call_timeout=timeout, question=q["question"], options=q["options"])
            round_trip = time.monotonic() - asked
            if how == "action" and outcome.success and scene_text_complete(outcome.answer.raw_response):
                # feedback travels on its own DDS writer: the scene graph sent before the result may come after it
                client.wait(lambda: client.Action.Feedback.STAGE_SCENE_READY in stages, timeout,
                            "the scene-ready feedback the node sent before its result")
            if not outcome.success:
                raise DemoFailure(f"the {how} request failed: error {outcome.error_code}: {outcome.message}")
            summary = summarize(outcome.answer, how, round_trip)
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
    except WaitFailed as exc:   # it names what did not arrive and carries the node's log tail
        raise DemoFailure(f"{part.title}: {exc}") from None
    except DemoFailure as exc:
        raise DemoFailure(f"{part.title}: {exc}\n--- {process.describe()}") from None
    finally:
        client.close()
        code = process.stop()
        if code not in (0, None, -signal.SIGINT):
            print(f"  note: the node exited with code {code} (log: {log_path})")
        try:   # until discovery notices, the stopped node's subscriptions would pass for the next node's
            wait_for(camera.unsubscribed, 10.0, "the stopped node's subscriptions to vanish")
        except WaitFailed as exc:
            print(f"  note: {exc}")


def check_meaningful(summary: dict[str, Any], question: dict[str, Any]) -> None:
    """The replay part must show what the node does with a good answer; anything less is a bug worth failing on."""
    if summary["status"] != "complete" or summary["answer"] != question["answer"]:
        raise DemoFailure(f"the recorded answer came back as {summary['status']} {summary['answer']!r} "
                          f"({summary['status_message']})")
    if not summary["objects"] or any(o["position_m"] is None for o in summary["objects"]):
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
    scratch = isolate_ros(prefix="spatialthinker-demo-", offline=False)
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
        camera = sample_camera(context, sample)
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
        shutil.rmtree(scratch, ignore_errors=True)
    if failure is not None:
        print(f"\nDEMO FAILED: {failure}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED if failure == "interrupted" else EXIT_FAILED
    banner([f"Done. Annotated images: {', '.join(written)}",
            f"Answers and node logs: {args.output}/*_answers.json, {args.output}/*_node.log",
            *disclaimer(label, tiny, parts)])
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
