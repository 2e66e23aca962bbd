"""Any depth frame costs a bounded time and memory per box (issue 24): hypothesis feeds frames of every hostile value
(NaN, +-inf, negative, zero, subnormal, 1e-30, 65535 units of a large scale, readings nearer than min_depth) in
16UC1 and 32FC1, random boxes and intrinsics, to the lift and to finish_result. The only refusal is a ValueError
for inputs the types refuse when built (intrinsics, depth scale); nothing else may raise.

The bounds are far above what a box costs (bench/README.md, "Bounded cost") and far below what the unbounded
histogram cost (880 MB and 2.9 s for one box of 1e-5 m readings), so they catch the bug, not the machine's load."""

from __future__ import annotations

import json
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis_profiles import examples

from spatialthinker_ros.core.depth_layers import depth_layers
from spatialthinker_ros.core.geometry import CameraIntrinsics, DepthImage, LiftConfig, lift_box
from spatialthinker_ros.core.pipeline import PipelineConfig, finish_result
from spatialthinker_ros.core.types import Box, InferenceRequest, InferenceResult

CALL_BOUND_S = 1.0          # one call; a 1080p box takes milliseconds
CALL_BOUND_BYTES = 16 << 20  # peak Python/numpy allocations of one call (tracemalloc)

FLOAT_VALUES = [np.nan, np.inf, -np.inf, -1.0, -0.0, 0.0, 1e-45, 1e-38, 1e-30, 1e-6, 1e-5, 1e-3, 0.049, 0.05, 0.07,
                0.3, 1.0, 3.0, 19.99, 20.0, 20.01, 1e6, 1e30, 3.4e38]
INTEGER_VALUES = [0, 1, 2, 49, 50, 70, 71, 300, 1000, 3000, 20000, 65534, 65535]
SCALES = [1e-6, 1e-4, 0.001, 0.01, 1.0, 10.0]          # the node's depth_scale range is [1e-6, 10]


@st.composite
def depth_frames(draw) -> DepthImage:
    """A frame drawn from a few hostile values in random patches, plus a random smooth surface."""
    height, width = draw(st.integers(1, 120)), draw(st.integers(1, 160))
    integer = draw(st.booleans())
    pool = st.sampled_from(INTEGER_VALUES) | st.integers(0, 65535) if integer else (
        st.sampled_from(FLOAT_VALUES) | st.floats(width=32, allow_nan=True, allow_infinity=True))
    values = draw(st.lists(pool, min_size=1, max_size=6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = np.uint16 if integer else np.float32
    frame = np.asarray(values, dtype)[rng.integers(0, len(values), (height, width))]
    if draw(st.booleans()):   # a tilted surface over part of it, so layers have something to split
        top, left = rng.integers(0, height), rng.integers(0, width)
        surface = np.linspace(draw(st.floats(0.0, 30.0)), draw(st.floats(0.0, 30.0)), width - left, dtype=np.float32)
        if integer:
            frame[top:, left:] = np.clip(surface * 1000, 0, 65535).astype(np.uint16)
        else:
            frame[top:, left:] = surface
    return DepthImage(frame, draw(st.sampled_from(SCALES))) if integer else DepthImage.from_metres(frame)


coordinates = st.floats(-50.0, 250.0)
boxes = st.builds(Box, coordinates, coordinates, coordinates, coordinates)
image_sizes = st.tuples(st.integers(1, 4000), st.integers(1, 4000))
intrinsics = st.builds(CameraIntrinsics, fx=st.floats(1e-3, 1e6), fy=st.floats(1e-3, 1e6), cx=st.floats(-1e4, 1e4),
                       cy=st.floats(-1e4, 1e4), width=st.integers(1, 4000), height=st.integers(1, 4000))
lift_configs = st.builds(LiftConfig, min_valid_fraction=st.floats(1e-6, 1.0), min_depth_m=st.sampled_from([1e-3, 0.05]),
                         max_depth_m=st.sampled_from([20.0, 1000.0]), shrink=st.floats(0.01, 1.0))


def bounded(call):
    """call()'s result, after checking its time and peak allocations."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        result = call()
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < CALL_BOUND_S, f"{elapsed:.2f} s"
    assert peak < CALL_BOUND_BYTES, f"{peak / 2**20:.0f} MB"
    return result


def check_position(position, config: LiftConfig) -> None:
    """A returned position comes from valid depth: finite, its surface within [min_depth, max_depth]."""
    if position is None:
        return
    values = (position.x, position.y, position.z, position.size_x, position.size_y, position.size_z,
              position.depth_spread)
    assert all(np.isfinite(values)), position
    surface = position.z - position.size_z / 2
    assert config.min_depth_m * (1 - 1e-6) <= surface <= config.max_depth_m * (1 + 1e-6), position


@settings(max_examples=examples(300), suppress_health_check=[HealthCheck.too_slow])
@given(depth_frames(), boxes, intrinsics, image_sizes, lift_configs, st.floats(0.0, 0.1))
@example(DepthImage.from_metres(np.full((480, 640), 1e-6, np.float32)), Box(100, 100, 300, 300),
         CameraIntrinsics(500.0, 500.0, 319.5, 239.5, 640, 480), (640, 480), LiftConfig(min_depth_m=1e-3), 0.005)
@example(DepthImage(np.full((48, 64), 1, np.uint16), 1e-6), Box(0, 0, 64, 48),
         CameraIntrinsics(50.0, 50.0, 31.5, 23.5, 64, 48), (64, 48), LiftConfig(min_depth_m=1e-3), 0.0)
def test_any_frame_costs_a_bounded_lift(depth, box, k, image_size, config, noise):
    position = bounded(lambda: lift_box(box, depth, k, image_size, config, depth_noise_per_m=noise))
    event("no position" if position is None else "a position")
    check_position(position, config)


@settings(max_examples=examples(100), suppress_health_check=[HealthCheck.too_slow])
@given(depth_frames(), st.lists(boxes, min_size=1, max_size=4), intrinsics)
def test_any_frame_costs_a_bounded_finish(depth, object_boxes, k):
    """finish_result lifts every object of a parsed answer: bounded, and positions only from valid depth."""
    height, width = depth.shape
    scene = {"objects": [{"id": f"thing.{i}", "bbox": [b.x_min, b.y_min, b.x_max, b.y_max]}
                         for i, b in enumerate(object_boxes)],
             "relationships": [{"subject": "thing.0", "predicate": "left of",
                                "object": f"thing.{len(object_boxes) - 1}"}]}
    text = (f"<observe>Things.</observe>\n<scene>{json.dumps(scene)}</scene>\n<think>Look.</think>\n"
            "<answer>(A) left of</answer>")
    request = InferenceRequest(image=np.zeros((240, 320, 3), np.uint8), prompt="Image size: 320 x 240",
                               question="Where?")
    config = PipelineConfig()
    result = bounded(lambda: finish_result(request, InferenceResult(text=text), ["left of", "right of"],
                                           (width, height), depth, k, config=config))
    for obj in result.parsed.scene.objects:
        check_position(obj.position, config.lift)


@pytest.mark.parametrize("metres", [1e-3, 1e-4, 1e-5, 1e-6, 1e-30])
def test_the_issue_frames_cost_milliseconds_and_kilobytes(metres):
    """Issue 24's frame: one 200 x 200 px box of a 32FC1 frame with a 40 x 80 px patch of tiny readings (1e-5 m
    took 880 MB and 2.9 s), with min_depth lowered below the readings so they are read, not refused."""
    frame = np.full((480, 640), 2.0, np.float32)
    frame[200:240, 200:280] = metres
    k = CameraIntrinsics(500.0, 500.0, 319.5, 239.5, 640, 480)
    config = LiftConfig(min_depth_m=min(metres, 1e-3))
    position = bounded(lambda: lift_box(Box(150, 150, 350, 350), DepthImage.from_metres(frame), k, (640, 480),
                                        config))
    assert position.z == pytest.approx(2.0) and position.ambiguous, "the wall, marked: a nearer layer in front"
    # at the default min_depth (5 cm) such readings are invalid, like 0 and NaN: never a position of 1 mm
    assert lift_box(Box(200, 200, 280, 240), DepthImage.from_metres(frame), k, (640, 480)) is None


def test_layers_of_any_depths_fit_the_bin_bound():
    """1e-30 m next to 3.4e38 m, noise model off, a 1 um step: the histogram still has at most 2^16 bins."""
    depths = np.array([1e-30, 1e-6, 0.07, 1.0, 3.4e38] * 100, np.float32)
    layers = bounded(lambda: depth_layers(depths, noise_per_m=0.0, step=1e-6))
    assert layers.count >= 1 and layers.labels.shape == depths.shape
