"""spatialthinker_node as a real process on an isolated graph: service, action, outputs, cameras, errors."""

import itertools
import json
import time

import numpy as np
import psutil
import pytest
from lifecycle_msgs.msg import Transition
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from spatialthinker_ros.action import AskSpatial as AskSpatialAction
from spatialthinker_ros.core.images import colour_to_rgb
from spatialthinker_ros.ros.conversions import rgb_to_compressed_msg
from spatialthinker_ros.testing.node_client import spin_future, spin_until
from spatialthinker_ros.testing.processes import node_command
from spatialthinker_ros.msg import SceneRelation, SpatialAnswer
from spatialthinker_ros.srv import AskSpatial, CancelAsk
from node_requests import CALL, E, OPTIONS, QUESTION, RESPONSE, STARTUP, replay_params

CLIENT_IDS = itertools.count()
K = [500.0, 0.0, 320.0, 0.0, 500.0, 240.0, 0.0, 0.0, 1.0]


def test_replay_answer_field_by_field_with_3d_markers_and_debug_image(spawn, client, camera, replay_file):
    cam = camera(depth_m=np.full((480, 640), 2.0, np.float32), k=K)
    proc = spawn(node_command(**replay_params(replay_file)), name="node")
    response = client.ask_until_ready(proc, with_depth=True, question=QUESTION, options=OPTIONS)
    assert response.success, response.message
    assert (response.image.width, response.image.height, len(response.image.data)) == (0, 0, 0), "not asked for"
    answer = response.answer
    assert (answer.answer, answer.choice, answer.status) == ("(A) left of", "A", SpatialAnswer.STATUS_COMPLETE)
    assert answer.observation == "A cup and a plate on a table." and "left of the plate" in answer.reasoning
    assert answer.question == QUESTION and list(answer.options) == OPTIONS and answer.camera == "default"
    assert answer.raw_response == RESPONSE and answer.model == "replay"
    # the replayed option probabilities, in option order; no calibration: no prediction set
    assert list(answer.option_probabilities) == pytest.approx([0.8, 0.2])
    assert list(answer.prediction_set) == [] and answer.prediction_set_coverage == 0.0
    assert answer.status_message == ""
    # the answer's header is the source frame's header
    assert answer.header.frame_id == "camera_color_optical_frame"
    assert (answer.header.stamp.sec, answer.header.stamp.nanosec) in cam.published_stamps
    assert answer.scene_graph.header == answer.header
    graph = answer.scene_graph
    assert (graph.image_width, graph.image_height) == (640, 480)
    cup, plate = graph.objects
    # boxes mapped from the model's 320x240 image back to the 640x480 camera image
    assert (cup.id, cup.label) == ("cup.1", "cup")
    assert (cup.x_min, cup.y_min, cup.x_max, cup.y_max) == pytest.approx((100, 100, 200, 200))
    assert (plate.x_min, plate.y_min, plate.x_max, plate.y_max) == pytest.approx((300, 200, 500, 400))
    # 3D from a flat 2 m depth image: centre (150, 150) px -> x = (150-320)*2/500, y = (150-240)*2/500
    assert cup.has_position
    assert (cup.position.x, cup.position.y, cup.position.z) == pytest.approx((-0.68, -0.36, 2.0), abs=0.01)
    assert cup.size.x == pytest.approx(0.4, abs=0.05) and cup.size.y == pytest.approx(0.4, abs=0.05)
    assert (plate.position.x, plate.position.y, plate.position.z) == pytest.approx((0.32, 0.24, 2.0), abs=0.01)
    relation = graph.relations[0]
    assert (relation.subject, relation.predicate, relation.object) == ("cup.1", "left of", "plate.1")
    # published outputs
    assert spin_until(client.node, lambda: client.answers and client.graphs and client.markers, CALL)
    assert client.answers[-1].request_id == answer.request_id
    assert client.graphs[-1] == graph
    cubes = [m for m in client.markers[-1].markers if m.ns == "objects"]
    assert len(cubes) == 2 and cubes[0].header.frame_id == "camera_color_optical_frame"
    assert cubes[0].pose.position.z == pytest.approx(2.0, abs=0.01)
    assert any(m.ns == "relations" for m in client.markers[-1].markers)
    # the debug image is only drawn while someone subscribes: we do, so ask again and receive it
    assert spin_until(client.node, lambda: client.node.count_publishers("/spatialthinker/debug_image") > 0, CALL)
    response = client.ask(question=QUESTION, options=OPTIONS)
    assert spin_until(client.node, lambda: client.debug, CALL)
    debug = client.debug[-1]
    assert (debug.width, debug.height, debug.encoding) == (640, 480, "rgb8")
    drawn = np.frombuffer(debug.data, np.uint8).reshape(480, 640, 3)
    assert not np.array_equal(drawn, cam.rgb), "boxes were drawn"
    assert np.array_equal(drawn[470:, 600:], cam.rgb[470:, 600:]), "away from boxes and caption, pixels unchanged"
    # return_image: the very frame answered on, undrawn, with the answer's header
    response = client.ask(question=QUESTION, options=OPTIONS, return_image=True)
    assert response.success, response.message
    frame = response.image
    assert (frame.width, frame.height, frame.encoding, frame.step) == (640, 480, "rgb8", 640 * 3)
    assert frame.header == response.answer.header
    assert np.array_equal(np.frombuffer(frame.data, np.uint8).reshape(480, 640, 3), cam.rgb)
    assert proc.alive()


def test_an_ambiguous_position_is_shown_differently_in_markers_and_the_debug_image(spawn, client, camera,
                                                                                  replay_file):
    """A nearer surface over 45 % of plate.1's box makes its position a guess: its cube is faint, its label ends in
    the ambiguous mark, its box in the debug image is dashed; cup.1 on the plain wall is drawn as before."""
    from spatialthinker_ros.core.annotate import AMBIGUOUS_MARK
    from spatialthinker_ros.ros.visualization import AMBIGUOUS_ALPHA, BOX_ALPHA

    depth = np.full((480, 640), 2.0, np.float32)
    depth[200:400, 300:390] = 1.0                    # the left 45 % of plate.1's box (300..500, 200..400)
    cam = camera(depth_m=depth, k=K)
    proc = spawn(node_command(**replay_params(replay_file)), name="node")
    response = client.ask_until_ready(proc, with_depth=True, question=QUESTION, options=OPTIONS)
    cup, plate = response.answer.scene_graph.objects
    assert plate.depth_ambiguous and not cup.depth_ambiguous
    assert response.answer.scene_graph.relations[0].check == SceneRelation.CHECK_UNCERTAIN
    assert spin_until(client.node, lambda: client.markers, CALL)
    markers = client.markers[-1].markers
    cubes = {m.id: m for m in markers if m.ns == "objects"}
    labels = {m.id: m for m in markers if m.ns == "labels"}
    assert (cubes[0].color.a, cubes[2].color.a) == pytest.approx((BOX_ALPHA, AMBIGUOUS_ALPHA))
    assert labels[3].text.endswith(AMBIGUOUS_MARK) and not labels[1].text.endswith(AMBIGUOUS_MARK)
    assert spin_until(client.node, lambda: client.node.count_publishers("/spatialthinker/debug_image") > 0, CALL)
    client.ask(question=QUESTION, options=OPTIONS)
    assert spin_until(client.node, lambda: client.debug, CALL)
    drawn = np.frombuffer(client.debug[-1].data, np.uint8).reshape(480, 640, 3)
    changed = np.any(drawn != cam.rgb, axis=2)
    assert changed[200, 110:190].all(), "cup.1's bottom edge: solid"
    assert not changed[400, 310:490].all() and changed[400, 310:490].mean() > 0.3, "plate.1's bottom edge: dashed"
    assert proc.alive()


def test_depth_in_millimetres_at_half_resolution(spawn, client, camera, replay_file):
    k_half = [250.0, 0.0, 160.0, 0.0, 250.0, 120.0, 0.0, 0.0, 1.0]
    camera(depth_m=np.full((240, 320), 1.5, np.float32), depth_encoding="16UC1", k=k_half)
    proc = spawn(node_command(**replay_params(replay_file)), name="node")
    response = client.ask_until_ready(proc, with_depth=True, question=QUESTION, options=OPTIONS)
    assert response.success, response.message
    cup = response.answer.scene_graph.objects[0]
    assert cup.has_position
    assert (cup.position.x, cup.position.y, cup.position.z) == pytest.approx((-0.51, -0.27, 1.5), abs=0.01)


def test_depth_one_frame_late_still_pairs_with_the_frame_before(spawn, client, camera, replay_file):
    """Depth that trails colour by a frame (period 0.1 s > the 0.05 s sync tolerance): the newest colour frame never
    has its depth yet, so each answer uses the frame before it, which has, rather than dropping the 3D."""
    cam = camera(rate_hz=10.0, depth_m=np.full((480, 640), 2.0, np.float32), k=K, depth_lags=True)
    proc = spawn(node_command(**replay_params(replay_file)), name="node")
    assert client.ask_until_ready(proc, with_depth=True, question=QUESTION, options=OPTIONS).success
    for _ in range(8):
        response = client.ask(question=QUESTION, options=OPTIONS)
        assert response.success and response.answer.scene_graph.objects[0].has_position, response.message
        stamp = (response.answer.header.stamp.sec, response.answer.header.stamp.nanosec)
        assert stamp in cam.published_stamps[:-1], "answered on a colour frame that had its depth"
        sent = len(cam.published_stamps)   # the next question about the next frame
        assert spin_until(client.node, lambda: len(cam.published_stamps) > sent, CALL)


def test_a_fresh_frame_without_depth_is_preferred_to_a_stale_one_with_depth(spawn, client, camera, replay_file):
    """Slow camera (1 Hz), depth one frame late, max_image_age 1.6 s: the frame before the newest is often too old,
    so the answer uses the newest frame without 3D rather than failing as stale. The newest is at most 1 s old,
    which leaves 0.6 s for a loaded machine's delays."""
    cam = camera(rate_hz=1.0, depth_m=np.full((480, 640), 2.0, np.float32), k=K, depth_lags=True)
    proc = spawn(node_command(**replay_params(replay_file, max_image_age=1.6)), name="node")
    assert client.ask_until_ready(proc, question=QUESTION, options=OPTIONS).success

    def frame_before_newest_too_old() -> bool:   # older than max_image_age, with some margin for the request
        stamps = cam.published_stamps
        if len(stamps) < 2:
            return False
        sec, nanosec = stamps[-2]
        return client.node.get_clock().now().nanoseconds - (sec * 10**9 + nanosec) > 1.7e9

    responses = []
    for i in range(8):   # alternately: just after a frame was sent, and once the frame before it is too old
        sent = len(cam.published_stamps)
        assert spin_until(client.node, frame_before_newest_too_old if i % 2 else
                          (lambda: len(cam.published_stamps) > sent), CALL)
        responses.append(client.ask(question=QUESTION, options=OPTIONS))
    assert all(r.success for r in responses), [r.message for r in responses if not r.success]
    assert not all(r.answer.scene_graph.objects[0].has_position for r in responses), "some on the newest frame"


def test_action_feedback_stages_and_early_scene_graph(spawn, client, camera, replay_file):
    camera()
    proc = spawn(node_command(**replay_params(replay_file)), name="node")
    assert client.ask_until_ready(proc, question=QUESTION, options=OPTIONS).success
    assert spin_until(client.node, client.action.server_is_ready, CALL), proc.output()
    feedback = []
    goal = AskSpatialAction.Goal(question=QUESTION, options=OPTIONS)
    handle = spin_future(client.node, client.action.send_goal_async(
        goal, feedback_callback=lambda m: feedback.append(m.feedback)), CALL)
    assert handle.accepted
    result = spin_future(client.node, handle.get_result_async(), CALL).result
    assert result.success and result.answer.choice == "A"
    assert result.answer.request_id == bytes(handle.goal_id.uuid).hex()
    F = AskSpatialAction.Feedback
    # feedback travels on its own topic: what was sent before the result may be taken after it
    assert spin_until(client.node, lambda: any(f.stage == F.STAGE_SCENE_READY for f in feedback), CALL)
    stages = [f.stage for f in feedback]
    assert stages[0] == F.STAGE_QUEUED and F.STAGE_GENERATING in stages and F.STAGE_SCENE_READY in stages
    assert stages == sorted(stages), stages
    ready = next(f for f in feedback if f.stage == F.STAGE_SCENE_READY)
    assert [o.id for o in ready.scene_graph.objects] == ["cup.1", "plate.1"]
    assert ready.scene_graph.objects[0].x_max == pytest.approx(200)
    assert ready.scene_graph.header == result.answer.header


def test_transformers_backend_tiny_checkpoint_service_and_action(spawn, client, camera, tiny_checkpoint):
    camera(width=320, height=240)
    proc = spawn(node_command(backend="transformers", model=str(tiny_checkpoint), device="cpu", max_new_tokens=24,
                           max_image_age=0.0), name="node")
    response = client.ask_until_ready(proc, timeout=120.0, question="Where is the cup?", options=["left", "right"])
    assert response.success, response.message + proc.output()
    answer = response.answer
    assert answer.model == str(tiny_checkpoint)
    assert answer.prompt_tokens > 50 and 0 < answer.completion_tokens <= 24
    assert answer.raw_response and answer.inference_time.sec + answer.inference_time.nanosec > 0
    assert answer.status == SpatialAnswer.STATUS_NO_ANSWER, "a random model's noise has no <answer>"
    assert answer.status_message
    assert spin_until(client.node, client.action.server_is_ready, CALL)
    feedback = []
    handle = spin_future(client.node, client.action.send_goal_async(
        AskSpatialAction.Goal(question="What is on the table?"),
        feedback_callback=lambda m: feedback.append(m.feedback)), CALL)
    result = spin_future(client.node, handle.get_result_async(), 120.0).result
    assert result.success, result.message
    F = AskSpatialAction.Feedback
    # feedback travels on its own topic: what was sent before the result may be taken after it
    assert spin_until(client.node, lambda: any(f.stage == F.STAGE_GENERATING for f in feedback), CALL), feedback
    assert feedback[0].stage == F.STAGE_QUEUED


def test_compressed_input(spawn, client, camera, replay_file):
    cam = camera(compressed=True)
    proc = spawn(node_command(**replay_params(replay_file, image_transport="compressed")), name="node")
    response = client.ask_until_ready(proc, question=QUESTION, options=OPTIONS)
    assert response.success, response.message
    assert (response.answer.scene_graph.image_width, response.answer.scene_graph.image_height) == (640, 480)
    assert response.answer.scene_graph.objects[1].x_max == pytest.approx(500)
    # the action's return_image: the JPEG frame the node decoded, as rgb8
    result = client.ask_action(question=QUESTION, options=OPTIONS, return_image=True)
    assert result.success, result.message
    assert (result.image.width, result.image.height, result.image.encoding) == (640, 480, "rgb8")
    assert result.image.header == result.answer.header
    sent = colour_to_rgb(rgb_to_compressed_msg(cam.rgb, Header()), 640 * 480)   # as FakeCamera sends it
    assert np.array_equal(np.frombuffer(result.image.data, np.uint8).reshape(480, 640, 3), sent), "JPEG decoded"


def vm_peak_mb(proc) -> float:
    """The process's peak resident memory (VmHWM) in MB."""
    status = open(f"/proc/{proc.pid}/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def test_a_compressed_frame_declaring_too_many_pixels_is_dropped_before_decoding(spawn, client, frames, replay_file,
                                                                               tmp_path):
    """A 50 KB PNG whose header declares 20000 x 20000 pixels would be 1.2 GB once decoded: the node reads the size
    from the header and refuses the frame first."""
    from PIL import Image as PillowImage
    from sensor_msgs.msg import CompressedImage

    PillowImage.new("1", (20000, 20000)).save(tmp_path / "bomb.png")
    bomb = (tmp_path / "bomb.png").read_bytes()
    frames.set("image/compressed", CompressedImage, lambda header: CompressedImage(header=header, format="png",
                                                                                   data=bomb))
    proc = spawn(node_command(**replay_params(replay_file, image_transport="compressed")), name="node")
    client.wait_for_service(proc)
    before = vm_peak_mb(proc)
    deadline = time.monotonic() + STARTUP
    response = client.ask(question=QUESTION, options=OPTIONS)
    while "has not delivered a frame" in response.message:     # until a frame arrived
        assert time.monotonic() < deadline, f"no frame reached the node: {proc.tail()}"
        response = client.ask(question=QUESTION, options=OPTIONS)
    assert response.error_code == E.ERROR_NO_IMAGE and "is unusable" in response.message, response.message
    assert vm_peak_mb(proc) - before < 300, "the frame was decoded"
    assert "header declares more than" in response.message and "pixel limit" in response.message, response.message
    assert proc.alive()


def test_a_hostile_depth_frame_costs_bounded_memory_and_the_next_good_frame_is_answered(spawn, client, camera,
                                                                                        replay_file):
    """Issue 24: an 80 x 80 px patch of 1e-6 m in a 32FC1 frame raised the node's peak RSS by 9.5 GB (the depth
    histogram had a bin per 5e-3 of 1/z down to 1/1e-6). Now such readings are invalid (min_depth) and no box has
    more than 2^16 depth bins: the hostile frame costs no memory to speak of, and the good camera's frame after it is
    answered with its positions."""
    hostile = np.full((480, 640), 2.0, np.float32)
    hostile[260:340, 360:440] = 1e-6                 # inside plate.1's box (300..500, 200..400)
    cup = hostile[100:200, 100:200]                  # cup.1's box: every other hostile value, nothing valid
    for i, value in enumerate([np.nan, np.inf, -np.inf, -1.0, 0.0, 1e-45, 1e-30, 0.001, 3.4e38, 1e30]):
        cup[i * 10:(i + 1) * 10] = value
    camera(prefix="hostile/", depth_m=hostile, k=K)
    camera(prefix="good/", depth_m=np.full((480, 640), 2.0, np.float32), k=K)
    proc = spawn(node_command(**replay_params(replay_file, cameras=["hostile", "good"])), name="node")
    client.wait_for_service(proc)
    before = vm_peak_mb(proc)
    response = client.ask_until_ready(proc, with_depth=True, question=QUESTION, options=OPTIONS, camera="hostile")
    assert response.success, response.message
    cup_answer, plate = response.answer.scene_graph.objects
    assert not cup_answer.has_position and "depth invalid inside the box of cup.1" in response.answer.status_message
    assert plate.has_position and plate.position.z == pytest.approx(2.0, abs=0.01), "the wall, not 1e-6 m"
    assert vm_peak_mb(proc) - before < 100, "the hostile frame's depth cost memory"
    good = client.ask_until_ready(proc, with_depth=True, question=QUESTION, options=OPTIONS, camera="good")
    assert good.success and all(o.has_position for o in good.answer.scene_graph.objects), good.message
    assert vm_peak_mb(proc) - before < 100
    assert proc.alive()


def test_two_cameras_selected_per_request(spawn, client, camera, replay_file):
    camera(prefix="left/", width=640, height=480, frame_id="left_optical")
    camera(prefix="right/", width=1280, height=960, frame_id="right_optical")
    proc = spawn(node_command(**replay_params(replay_file, cameras=["left", "right"],
                                           max_input_pixels=320 * 240)), name="node")
    left = client.ask_until_ready(proc, question=QUESTION, options=OPTIONS, camera="left")
    right = client.ask_until_ready(proc, question=QUESTION, options=OPTIONS, camera="right")
    default = client.ask_until_ready(proc, question=QUESTION, options=OPTIONS)
    assert left.success and right.success and default.success, (left.message, right.message)
    assert (left.answer.header.frame_id, left.answer.camera) == ("left_optical", "left")
    assert (right.answer.header.frame_id, right.answer.camera) == ("right_optical", "right")
    assert default.answer.camera == "left", "the first configured camera is the default"
    assert right.answer.scene_graph.image_width == 1280
    assert right.answer.scene_graph.objects[0].x_max == pytest.approx(400), "boxes scaled x4 to 1280x960"
    assert left.answer.scene_graph.objects[0].x_max == pytest.approx(200)


def test_error_codes(spawn, client, camera, replay_file):
    proc = spawn(node_command(**replay_params(replay_file, max_question_chars=100)), name="node")
    client.wait_for_service(proc)
    # no frame yet
    response = client.ask(question=QUESTION)
    assert (response.success, response.error_code) == (False, E.ERROR_NO_IMAGE), response.message
    assert "has not delivered a frame" in response.message
    camera()
    assert client.ask_until_ready(proc, question=QUESTION, options=OPTIONS).success
    cases = [
        (dict(question=""), E.ERROR_INVALID_REQUEST, "empty"),
        (dict(question="   \n"), E.ERROR_INVALID_REQUEST, "empty"),
        (dict(question="x" * 101), E.ERROR_INVALID_REQUEST, "100"),
        (dict(question=QUESTION, options=[""]), E.ERROR_INVALID_REQUEST, "option"),
        (dict(question=QUESTION, options=[str(i) for i in range(27)]), E.ERROR_INVALID_REQUEST, "26"),
        (dict(question=QUESTION, camera="rear"), E.ERROR_UNKNOWN_CAMERA, "rear"),
        (dict(question=QUESTION, max_image_age=-1.0), E.ERROR_INVALID_REQUEST, "max_image_age"),
        (dict(question="not recorded"), E.ERROR_BACKEND, "no recorded response"),
        (dict(question=QUESTION, image=Image(width=4, height=4, encoding="rgb8", step=12, data=bytes(10))),
         E.ERROR_INVALID_REQUEST, "data"),
        (dict(question=QUESTION, image=Image(width=4, height=4, encoding="yuv422", step=8, data=bytes(32))),
         E.ERROR_INVALID_REQUEST, "unsupported encoding"),
    ]
    for fields, code, text in cases:
        response = client.ask(**fields)
        assert (response.success, response.error_code) == (False, code), (fields, response.message)
        assert text in response.message, (text, response.message)
    # a request image is used instead of the camera, with its own header
    bgr = np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8)
    image = Image(width=64, height=48, encoding="bgr8", step=64 * 3, data=bgr.tobytes())
    image.header.frame_id = "given"
    response = client.ask(question=QUESTION, options=OPTIONS, image=image, return_image=True)
    assert response.success and response.answer.header.frame_id == "given" and response.answer.camera == ""
    assert response.answer.scene_graph.image_width == 64
    returned = np.frombuffer(response.image.data, np.uint8).reshape(48, 64, 3)
    assert response.image.encoding == "rgb8" and np.array_equal(returned, bgr[..., ::-1]), "the request's image"
    # malformed model output is an answer with status, not an error
    response = client.ask(question="broken?")
    assert response.success and response.answer.status == SpatialAnswer.STATUS_PARTIAL
    assert "truncated" in response.answer.status_message or "not closed" in response.answer.status_message
    assert proc.alive()


def test_stale_frames_refused(spawn, client, camera, replay_file):
    camera(stamp_offset_s=5.0)
    proc = spawn(node_command(**replay_params(replay_file, max_image_age=1.0)), name="node")
    response = client.ask_until_ready(proc, question=QUESTION, options=OPTIONS)
    assert response.error_code == E.ERROR_STALE_IMAGE, response.message
    assert "old" in response.message
    response = client.ask(question=QUESTION, options=OPTIONS, max_image_age=10.0)
    assert response.success, "a per-request max_image_age overrides the parameter"


def test_busy_and_timeout(spawn, client, camera, tmp_path):
    """queue_size 1 behind a running generation: of six requests at once one waits and five are refused as busy, and
    request_timeout counts the wait and the run. Generations are held until the test creates their release file
    (the replay line's until_file), so which request runs and which waits never depends on the machine's speed; the
    one clock is request_timeout, which only the answers in time race, with many service round trips of margin."""
    camera()
    timeout_s = 10.0
    quick, held_busy, held_timeout = tmp_path / "quick", tmp_path / "release-busy", tmp_path / "release-timeout"
    started_busy, started_timeout = tmp_path / "started-busy", tmp_path / "started-timeout"
    quick.touch()                                  # QUESTION's generation ends at once
    replay = tmp_path / "held.jsonl"
    replay.write_text("".join(json.dumps(line) + "\n" for line in (
        {"question": QUESTION, "response": RESPONSE, "until_file": str(quick)},
        {"question": "busy?", "response": RESPONSE, "until_file": str(held_busy),
         "started_file": str(started_busy)},
        {"question": "timeout?", "response": RESPONSE, "until_file": str(held_timeout),
         "started_file": str(started_timeout)})))
    # replay_latency bounds a hold: reached only when the test fails before releasing it
    proc = spawn(node_command(**replay_params(replay, replay_latency=600.0, queue_size=1, max_batch_size=1,
                                              request_timeout=timeout_s)), name="node")
    try:
        assert client.ask_until_ready(proc, question=QUESTION, options=OPTIONS).success
        # six at once while one generation runs: one waits (queue_size 1), the other five are refused
        sending = client.action.send_goal_async(AskSpatialAction.Goal(question="busy?"))
        assert spin_until(client.node, lambda: sending.done() and started_busy.exists(), CALL), proc.tail()
        futures = [client.service.call_async(AskSpatial.Request(question=QUESTION)) for _ in range(6)]
        assert spin_until(client.node, lambda: sum(f.done() for f in futures) >= 5, CALL), proc.tail()
        refused = [f.result() for f in futures if f.done()]
        assert [r.error_code for r in refused] == [E.ERROR_BUSY] * 5, [(r.error_code, r.message) for r in refused]
        held_busy.touch()
        getting = sending.result().get_result_async()
        assert spin_until(client.node, lambda: getting.done() and all(f.done() for f in futures), CALL)
        assert getting.result().result.error_code == E.ERROR_NONE, getting.result().result.message
        codes = sorted(f.result().error_code for f in futures)
        assert codes == [E.ERROR_NONE] + [E.ERROR_BUSY] * 5, [f.result().message for f in futures]
        # a running generation cannot be interrupted: it times out while it runs, and the one behind it times out
        # while it waits, both at request_timeout from their acceptance
        running = client.service.call_async(AskSpatial.Request(question="timeout?"))
        assert spin_until(client.node, started_timeout.exists, CALL), proc.tail()
        behind = client.service.call_async(AskSpatial.Request(question=QUESTION))
        assert spin_until(client.node, lambda: running.done() and behind.done(), CALL), proc.tail()
        for response, where in ((running.result(), "running"), (behind.result(), "waiting")):
            assert response.error_code == E.ERROR_TIMEOUT, response.message
            assert f"timed out after {timeout_s:g} s ({where})" in response.message, response.message
    finally:
        held_busy.touch()
        held_timeout.touch()
    # the abandoned generation ends, and the worker answers again
    assert client.ask(question=QUESTION, options=OPTIONS).success
    assert proc.alive()


def rss_mb(proc) -> float:
    return psutil.Process(proc.pid).memory_info().rss / 2**20


def test_lifecycle_transitions_free_the_model(spawn, client, camera, heavy_tiny_checkpoint):
    weights_mb = sum(f.stat().st_size for f in heavy_tiny_checkpoint.glob("*.safetensors")) / 2**20
    assert weights_mb > 80
    camera(width=320, height=240)
    proc = spawn(node_command(backend="transformers", model=str(heavy_tiny_checkpoint), device="cpu",
                           max_new_tokens=16, autostart=False, max_image_age=0.0), name="node")
    client.wait_for_service(proc)
    assert client.lifecycle_state() == "unconfigured"
    response = client.ask(question=QUESTION)
    assert response.error_code == E.ERROR_NOT_ACTIVE and "unconfigured" in response.message
    assert client.change_state(Transition.TRANSITION_CONFIGURE)
    assert client.ask(question=QUESTION).error_code == E.ERROR_NOT_ACTIVE
    assert client.change_state(Transition.TRANSITION_ACTIVATE)
    assert client.lifecycle_state() == "active"
    assert client.ask_until_ready(proc, question=QUESTION).success
    loaded = rss_mb(proc)
    assert client.change_state(Transition.TRANSITION_DEACTIVATE)
    assert client.ask(question=QUESTION).error_code == E.ERROR_NOT_ACTIVE
    assert client.change_state(Transition.TRANSITION_CLEANUP)
    assert client.lifecycle_state() == "unconfigured"
    assert spin_until(client.node, lambda: client.stats and client.stats[-1]["backend"]["state"] == "released",
                      CALL), proc.output()
    freed = loaded - rss_mb(proc)
    assert freed > 0.7 * weights_mb, f"cleanup freed {freed:.0f} MB of a {weights_mb:.0f} MB model"
    # and it comes back
    assert client.change_state(Transition.TRANSITION_CONFIGURE)
    assert client.change_state(Transition.TRANSITION_ACTIVATE)
    assert client.ask_until_ready(proc, question=QUESTION).success
    assert proc.alive()


def test_a_service_request_is_cancelled_by_its_request_id(spawn, client, tmp_path):
    """~/cancel names a ~/ask request by the request_id its caller chose: the caller gets ERROR_CANCELLED at once,
    while the generation is held (until the test's release file exists), and ~/stats counts it. The id is the
    answer's, checked for form, and refused while a request with it is in progress."""
    release = tmp_path / "release"
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"question": QUESTION, "response": RESPONSE, "until_file": str(release)}) + "\n")
    proc = spawn(node_command(**replay_params(held, replay_latency=600.0)), name="node")
    client.wait_for_service(proc)
    cancel = client.node.create_client(CancelAsk, "/spatialthinker/cancel")
    assert spin_until(client.node, cancel.service_is_ready, CALL), "~/cancel is offered"
    image = Image(width=64, height=48, encoding="rgb8", step=64 * 3, data=bytes(64 * 48 * 3))
    try:
        asking = client.service.call_async(AskSpatial.Request(question=QUESTION, image=image, request_id="pick-7"))
        # the request is in progress once a cancel of its id says so (no sleep: the cancel is the condition)
        cancelled = []

        def cancelled_now() -> bool:
            if not cancelled or cancelled[-1].done():
                if cancelled and cancelled[-1].result().cancelled:
                    return True
                cancelled.append(cancel.call_async(CancelAsk.Request(request_id="pick-7")))
            return False
        assert spin_until(client.node, cancelled_now, CALL), "the held request never became cancellable"
        assert spin_until(client.node, asking.done, CALL), "the cancelled caller is answered at once, held or not"
        response = asking.result()
        assert (response.success, response.error_code) == (False, E.ERROR_CANCELLED), response.message
        again = spin_future(client.node, cancel.call_async(CancelAsk.Request(request_id="pick-7")), CALL)
        assert not again.cancelled, "answered: nothing left to cancel"
        assert spin_until(client.node, lambda: client.stats and client.stats[-1]["scheduler"]["cancelled"] == 1, CALL)
        # an id of the wrong form, and an id in use, are invalid requests; neither reaches the model
        bad = client.ask(question=QUESTION, image=image, request_id="has space")
        assert bad.error_code == E.ERROR_INVALID_REQUEST and "request_id" in bad.message, bad.message
        # a goal in progress is not ~/cancel's: the action cancels goals (and ends them as cancelled)
        stages = []
        handle = spin_future(client.node, client.action.send_goal_async(
            AskSpatialAction.Goal(question=QUESTION, image=image), feedback_callback=lambda m: stages.append(m)), CALL)
        assert handle.accepted and spin_until(client.node, lambda: stages, CALL), "the goal runs"
        goal_id = bytes(handle.goal_id.uuid).hex()
        refused = spin_future(client.node, cancel.call_async(CancelAsk.Request(request_id=goal_id)), CALL)
        assert not refused.cancelled, "a goal is cancelled through the action, not ~/cancel"
        # one client's requests are taken in order, and a request's id is registered as it is taken
        first = client.service.call_async(AskSpatial.Request(question=QUESTION, image=image, request_id="pick-8"))
        duplicate = spin_future(client.node, client.service.call_async(
            AskSpatial.Request(question=QUESTION, image=image, request_id="pick-8")), CALL)
        assert duplicate.error_code == E.ERROR_INVALID_REQUEST, duplicate.message
        assert "still in progress" in duplicate.message, duplicate.message
    finally:
        release.touch()
    answered = spin_future(client.node, first, CALL)
    assert answered.success and answered.answer.request_id == "pick-8", answered.message
    goal_result = spin_future(client.node, handle.get_result_async(), CALL).result
    assert goal_result.success and goal_result.answer.request_id == goal_id, goal_result.message
    assert proc.alive()


def test_activate_fails_while_a_generation_still_runs_and_works_once_it_ended(spawn, client, tmp_path):
    """Deactivating cannot interrupt a generation; activating while it still runs must fail (never a second worker
    on a busy backend), with the reason, and a later activate works. The generation is held until the test creates
    its release file, so it is still running at the refused activate however slow the machine."""
    release = tmp_path / "release"
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"question": QUESTION, "response": RESPONSE, "until_file": str(release)}) + "\n")
    latency = 600.0   # the hold's bound: only reached when the test fails before releasing it
    proc = spawn(node_command(**replay_params(held, replay_latency=latency)), name="node")
    client.wait_for_action(proc)
    image = Image(width=64, height=48, encoding="rgb8", step=64 * 3, data=bytes(64 * 48 * 3))
    stages = []
    sending = client.action.send_goal_async(AskSpatialAction.Goal(question=QUESTION, options=OPTIONS, image=image),
                                            feedback_callback=lambda m: stages.append(m.feedback.stage))
    assert spin_until(client.node, lambda: AskSpatialAction.Feedback.STAGE_GENERATING in stages, CALL), stages
    assert client.change_state(Transition.TRANSITION_DEACTIVATE)
    getting = sending.result().get_result_async()
    assert spin_until(client.node, getting.done, CALL)
    assert getting.result().result.error_code == E.ERROR_NOT_ACTIVE
    assert not client.change_state(Transition.TRANSITION_ACTIVATE)
    assert "cannot activate: the backend is still generating" in proc.output(), proc.tail()
    assert client.lifecycle_state() == "inactive"
    assert client.ask(question=QUESTION, image=image).error_code == E.ERROR_NOT_ACTIVE
    release.touch()                                                   # the generation ends now
    deadline = time.monotonic() + CALL
    while not client.change_state(Transition.TRANSITION_ACTIVATE):   # each try waits up to 5 s for the backend
        assert time.monotonic() < deadline, proc.tail()
    assert client.lifecycle_state() == "active"
    response = client.ask(question=QUESTION, options=OPTIONS, image=image, timeout=CALL)   # released: no hold
    assert response.success, response.message
    assert proc.alive()


def test_concurrent_requests_share_one_generate(spawn, client, camera, tiny_checkpoint):
    camera(width=320, height=240)
    proc = spawn(node_command(backend="transformers", model=str(tiny_checkpoint), device="cpu", max_new_tokens=32,
                           max_batch_size=8, max_image_age=0.0), name="node")
    assert client.ask_until_ready(proc, timeout=120.0, question="warm up").success
    futures = [client.service.call_async(AskSpatial.Request(question=f"Where is object {i}?")) for i in range(6)]
    assert spin_until(client.node, lambda: all(f.done() for f in futures), 120.0)
    responses = [f.result() for f in futures]
    assert all(r.success for r in responses), [r.message for r in responses]
    # members of one batch report the batch's wall time: equal times mean one generate served them
    times = [(r.answer.inference_time.sec, r.answer.inference_time.nanosec) for r in responses]
    largest_batch = max(times.count(t) for t in times)
    assert largest_batch >= 3, times
    assert len({r.answer.request_id for r in responses}) == 6


def test_camera_subscriptions_exist_only_while_active(spawn, client, replay_file):
    proc = spawn(node_command(**replay_params(replay_file), autostart=False), name="node")
    client.wait_for_service(proc)

    def subscribed(topic: str) -> int:
        return sum(info.node_name == "spatialthinker" for info in client.node.get_subscriptions_info_by_topic(topic))

    def topics_subscribed() -> int:
        return sum(subscribed(topic) for topic in ("/image", "/depth", "/camera_info"))

    assert topics_subscribed() == 0, "an unconfigured node subscribes to no camera"
    assert client.change_state(Transition.TRANSITION_CONFIGURE)
    assert client.lifecycle_state() == "inactive" and topics_subscribed() == 0, "an inactive node costs nothing"
    assert client.change_state(Transition.TRANSITION_ACTIVATE)
    assert spin_until(client.node, lambda: topics_subscribed() == 3, CALL), "active: image, depth and camera_info"
    assert client.change_state(Transition.TRANSITION_DEACTIVATE)
    assert spin_until(client.node, lambda: topics_subscribed() == 0, CALL), "deactivated: subscriptions destroyed"
    assert proc.alive()
