"""Per-answer CPU cost of what the product adds around the model: parsing, geometry, conversions, messages.

    .venv/bin/python -m bench.core_costs
    .venv/bin/python -m bench.core_costs --quick        # a few iterations (the smoke test uses it)
    python -m bench.core_costs          # on a machine without ROS: the message rows are skipped

Microbenchmarks (timeit, best of --repeat runs of an auto-sized loop) on the model card's example answer with
boxes in a 1920x1080 image, a 1920x1080 16UC1 depth frame and its intrinsics. The reference is json.loads of
the same scene JSON, timed in the same run: the ratio says what parsing costs beyond reading the JSON itself.
The relation checks (core/relations.py) are timed on a busier answer, 10 objects at different depths and 10
relations of every kind, both alone and as the difference they make to finish_result.
"""

from __future__ import annotations

import json
import re
import sys

import numpy as np

from bench._common import machine, per_call_us, quick_timing, table, timing_parser, write_results

from spatialthinker_ros.core.geometry import CameraIntrinsics, DepthImage, map_scene  # noqa: E402
from spatialthinker_ros.core.parsing import parse_response, scene_text_complete  # noqa: E402
from spatialthinker_ros.core.pipeline import PipelineConfig, finish_result, prepare_request  # noqa: E402
from spatialthinker_ros.core.relations import RelationCheckConfig, check_scene  # noqa: E402
from spatialthinker_ros.core.types import InferenceRequest, InferenceResult  # noqa: E402

WIDTH, HEIGHT = 1920, 1080
OPTIONS = ["on top of", "in front of", "behind", "beside"]
QUESTION = "Where is the cat relative to the couch?"
# The model card's example answer, boxes scaled to a 1920x1080 prompt image.
RESPONSE = (
    "<observe>\nThe image shows a living room with a couch, a coffee table, and a cat sitting on the floor.\n"
    "</observe>\n<scene>\n{\n  \"objects\": [\n    {\"id\": \"couch.1\", \"bbox\": [150, 225, 1200, 788]},\n"
    "    {\"id\": \"cat.1\", \"bbox\": [600, 675, 840, 900]},\n    {\"id\": \"table.1\", \"bbox\": [450, 563, 1050, 720]}\n"
    "  ],\n  \"relationships\": [\n    {\"subject\": \"cat.1\", \"predicate\": \"in front of\", \"object\": \"couch.1\"},\n"
    "    {\"subject\": \"cat.1\", \"predicate\": \"beside\", \"object\": \"table.1\"}\n  ]\n}\n</scene>\n<think>\n"
    "Looking at the scene graph, the cat is positioned in front of the couch and beside the coffee table. The "
    "bounding box coordinates show the cat is at y=675-900 while the couch extends to y=788, confirming the cat "
    "is on the floor in front of the couch.\n</think>\n<answer> (B) in front of the couch </answer>"
)
SCENE_JSON = re.search(r"<scene>(.*?)</scene>", RESPONSE, re.DOTALL).group(1)
# The same answer as a model might break it: single quotes and a trailing comma (json_repair's path).
BROKEN = RESPONSE.replace('"', "'").replace("]\n}", "],\n}")


# A tabletop of 10 objects left to right and 0.3 m apart in depth, with 10 relations: lateral, depth, vertical
# and unknown predicates, true and false.
TEN_BOXES = [[100 + 170 * i, 300 + 40 * (i % 3), 250 + 170 * i, 500 + 40 * (i % 3)] for i in range(10)]
TEN_PREDICATES = ["left of", "right of", "in front of", "behind", "to the left of", "closer to the camera than",
                  "on top of", "next to", "in front of", "left of"]
TEN_SCENE = {"objects": [{"id": f"thing.{i}", "bbox": box} for i, box in enumerate(TEN_BOXES)],
             "relationships": [{"subject": f"thing.{i}", "predicate": p, "object": f"thing.{(i + 3) % 10}"}
                               for i, p in enumerate(TEN_PREDICATES)]}
TEN_RESPONSE = (f"<observe>Ten things on a table.</observe>\n<scene>\n{json.dumps(TEN_SCENE, indent=2)}\n</scene>\n"
                "<think>Compare their boxes.</think>\n<answer> (A) left of </answer>")
TEN_CHECKS = "check_scene (10 objects, 10 relations)"
TEN_WITH = "finish_result + 3D + checks (10 objects, 10 relations, 1080p depth)"
TEN_WITHOUT = "finish_result + 3D, checks off (10 objects, 10 relations, 1080p depth)"


def cases() -> dict:
    rgb = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    depth_mm = np.full((HEIGHT, WIDTH), 2000, np.uint16)
    depth_mm[::7, ::5] = 0                                           # some invalid readings
    depth = DepthImage.from_sensor(depth_mm, "16UC1")                 # what the node holds: a view, unconverted
    converted = DepthImage.from_metres(depth.metres())                 # before: the whole frame converted first
    k = CameraIntrinsics(fx=1000.0, fy=1000.0, cx=959.5, cy=539.5, width=WIDTH, height=HEIGHT)
    request = InferenceRequest(image=rgb, prompt="", question=QUESTION)
    inference = InferenceResult(text=RESPONSE)
    parsed = parse_response(RESPONSE, OPTIONS, image_size=(WIDTH, HEIGHT))
    assert parsed.status.name == "COMPLETE" and len(parsed.scene.objects) == 3, parsed
    small = prepare_request(rgb, QUESTION, OPTIONS, PipelineConfig(max_input_pixels=1003520))
    ten_depth_mm = depth_mm.copy()
    for i, (x1, y1, x2, y2) in enumerate(TEN_BOXES):
        ten_depth_mm[y1:y2, x1:x2] = 1000 + 300 * i
    ten_depth = DepthImage.from_sensor(ten_depth_mm, "16UC1")
    ten = InferenceResult(text=TEN_RESPONSE)
    checks_off = PipelineConfig(relations=RelationCheckConfig(enabled=False))
    ten_lifted = finish_result(request, ten, OPTIONS, camera_size=(WIDTH, HEIGHT), depth=ten_depth, intrinsics=k,
                               config=checks_off).scene
    assert len(ten_lifted.relations) == 10 and all(o.position for o in ten_lifted.objects), ten_lifted
    c = {
        "json.loads(scene JSON) [reference]": lambda: json.loads(SCENE_JSON),
        "parse_response (full answer)": lambda: parse_response(RESPONSE, OPTIONS, image_size=(WIDTH, HEIGHT)),
        "parse_response (scene only)": lambda: parse_response(RESPONSE, OPTIONS, image_size=(WIDTH, HEIGHT),
                                                              scene_only=True),
        "parse_response (repaired JSON)": lambda: parse_response(BROKEN, OPTIONS, image_size=(WIDTH, HEIGHT)),
        "scene_text_complete (per streamed chunk)": lambda: scene_text_complete(RESPONSE),
        "map_scene (3 boxes, 1332x749 -> 1080p)": lambda: map_scene(
            parsed.scene.__class__(objects=parsed.scene.objects, relations=parsed.scene.relations,
                                   image_size=small.image.shape[1::-1]), (WIDTH, HEIGHT)),
        "depth 16UC1 1080p -> metres, whole frame [before]": lambda: depth.metres(),
        "finish_result, no depth": lambda: finish_result(request, inference, OPTIONS, camera_size=(WIDTH, HEIGHT)),
        "finish_result + 3D lift (1080p depth)": lambda: finish_result(request, inference, OPTIONS,
                                                                       camera_size=(WIDTH, HEIGHT), depth=depth,
                                                                       intrinsics=k),
        "finish_result + 3D lift, depth already in metres [before]": lambda: finish_result(
            request, inference, OPTIONS, camera_size=(WIDTH, HEIGHT), depth=converted, intrinsics=k),
        TEN_CHECKS: lambda: check_scene(ten_lifted),
        TEN_WITH: lambda: finish_result(request, ten, OPTIONS, camera_size=(WIDTH, HEIGHT), depth=ten_depth,
                                        intrinsics=k),
        TEN_WITHOUT: lambda: finish_result(request, ten, OPTIONS, camera_size=(WIDTH, HEIGHT), depth=ten_depth,
                                           intrinsics=k, config=checks_off),
        "prepare_request 1080p (prompt, no resize)": lambda: prepare_request(rgb, QUESTION, OPTIONS, PipelineConfig()),
        "prepare_request 1080p -> 1 MP (resize)": lambda: prepare_request(rgb, QUESTION, OPTIONS,
                                                                         PipelineConfig(max_input_pixels=1003520)),
    }
    try:   # message building needs the ROS message types (absent on a GPU server without ROS)
        from std_msgs.msg import Header

        from spatialthinker_ros.ros.conversions import spatial_answer_msg
        from spatialthinker_ros.ros.visualization import scene_markers

        result = finish_result(request, inference, OPTIONS, camera_size=(WIDTH, HEIGHT), depth=depth,
                               intrinsics=k)
        header = Header(frame_id="camera_color_optical_frame")
        c["SpatialAnswer message"] = lambda: spatial_answer_msg(result, header, "id", "cam", QUESTION, OPTIONS)
        c["MarkerArray (3 objects, 2 relations)"] = lambda: scene_markers(result.parsed.scene, header, 5.0)
    except ImportError as exc:
        print(f"[core_costs] no ROS message types here ({exc}); message rows skipped", file=sys.stderr)
    return c


def main(argv=None) -> int:
    args = timing_parser(__doc__, "core_costs").parse_args(argv)
    quick_timing(args)
    timings = {name: per_call_us(fn, args.repeat, args.min_time) for name, fn in cases().items()}
    reference = timings["json.loads(scene JSON) [reference]"]
    rows = [[name, f"{us:.1f}", f"{us / reference:.1f}x"] for name, us in timings.items()]
    print(f"\ncore costs per call, {machine()} (best of {args.repeat}; ratio to json.loads of the same scene JSON)")
    print(table(rows, ["step", "us", "vs json.loads"]))
    per_answer = (timings["finish_result + 3D lift (1080p depth)"]
                  + timings.get("SpatialAnswer message", 0.0) + timings.get("MarkerArray (3 objects, 2 relations)", 0.0))
    print(f"\nper answer at 1080p with depth (parse + boxes + 3D + messages): {per_answer / 1000:.2f} ms")
    lift = timings["finish_result + 3D lift (1080p depth)"]
    before = (timings["depth 16UC1 1080p -> metres, whole frame [before]"]
              + timings["finish_result + 3D lift, depth already in metres [before]"])
    print(f"depth read in metres only inside the boxes: {lift / 1000:.2f} ms against {before / 1000:.2f} ms for "
          f"converting the whole frame first ({before / lift:.1f}x)")
    checks_in_pipeline = timings[TEN_WITH] - timings[TEN_WITHOUT]
    print(f"relation checks, 10 objects and 10 relations: {timings[TEN_CHECKS]:.1f} us alone; finish_result "
          f"{timings[TEN_WITH]:.0f} us with them, {timings[TEN_WITHOUT]:.0f} us without ({checks_in_pipeline:+.0f} us)")
    path = write_results("core_costs", {"args": vars(args), "us_per_call": timings,
                                        "ratio_to_json_loads": {n: us / reference for n, us in timings.items()},
                                        "per_answer_ms": per_answer / 1000,
                                        "depth_in_boxes_ratio_to_whole_frame_first": before / lift,
                                        "relation_checks_us": {"alone": timings[TEN_CHECKS],
                                                               "in_finish_result": checks_in_pipeline}}, args.json)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
