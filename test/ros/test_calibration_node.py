"""The node's calibration_file: loaded at configure, refused when calibrated with another setup (the node names
the difference and stays unconfigured), accepted when the setups match."""

import dataclasses

import pytest
from lifecycle_msgs.msg import Transition

from spatialthinker_ros.core.checkpoint import checkpoint_fingerprint
from spatialthinker_ros.core.conformal import Calibration, CalibrationSetup
from spatialthinker_ros.testing.processes import node_command, wait_for
from node_requests import E, OPTIONS, QUESTION, STARTUP, replay_params

pytestmark = pytest.mark.timeout(180)


def write_calibration(path, prompt_style: str, setup=None):
    setup = setup or CalibrationSetup.replay(320 * 240, prompt_style)    # replay_params' setup
    Calibration(threshold=0.6, coverage=0.9, n=300, setup=setup).save(path)
    return path


def test_calibration_from_another_setup_is_refused_at_configure(spawn, client, replay_file, tmp_path):
    calibration = write_calibration(tmp_path / "calibration.json", prompt_style="training")
    named = (f"cannot configure: {calibration} was calibrated with another setup (prompt_style: calibrated "
             "'training', here 'model_card')")
    # by a lifecycle manager: the transition fails and the node stays unconfigured, still answering
    params = replay_params(replay_file, calibration_file=str(calibration))
    managed = spawn(node_command(**params, autostart=False), name="managed")
    client.wait_for_service(managed)
    assert not client.change_state(Transition.TRANSITION_CONFIGURE)
    assert client.lifecycle_state() == "unconfigured" and managed.alive()
    assert named in managed.output()
    assert client.ask(question=QUESTION).error_code == E.ERROR_NOT_ACTIVE
    managed.stop()
    # autostart (plain ros2 run): a failed configure ends the process with the reason
    started = spawn(node_command(**params), name="started")
    wait_for(lambda: not started.alive(), STARTUP, "the node to exit after its failed configure")
    assert started.exit_code() == 1 and named in started.output()


def test_calibration_of_the_same_setup_configures(spawn, client, camera, replay_file, tmp_path):
    calibration = write_calibration(tmp_path / "calibration.json", prompt_style="model_card")
    camera(width=640, height=480)
    proc = spawn(node_command(**replay_params(replay_file, calibration_file=str(calibration))), name="node")
    response = client.ask_until_ready(proc, question=QUESTION, options=OPTIONS)
    assert response.success, response.message
    assert client.lifecycle_state() == "active" and "cannot configure" not in proc.output()
    assert f"prediction sets: calibration {calibration} loaded (coverage 0.9, n = 300 rows)" in proc.output()
    # the replay line's probabilities are 0.8 and 0.2; threshold 0.6 keeps every option of at least 0.4: A only
    answer = response.answer
    assert list(answer.option_probabilities) == pytest.approx([0.8, 0.2])
    assert (list(answer.prediction_set), answer.prediction_set_coverage) == (["A"], pytest.approx(0.9))
    # a free-form question has no probabilities, so no set and coverage 0
    free = client.ask(question=QUESTION)
    assert free.success and (list(free.answer.option_probabilities), list(free.answer.prediction_set),
                             free.answer.prediction_set_coverage) == ([], [], 0.0)


def test_without_a_calibration_every_set_is_empty_with_coverage_0(spawn, client, camera, replay_file):
    camera(width=640, height=480)
    proc = spawn(node_command(**replay_params(replay_file)), name="node")
    response = client.ask_until_ready(proc, question=QUESTION, options=OPTIONS)
    assert response.success, response.message
    assert list(response.answer.option_probabilities) == pytest.approx([0.8, 0.2])
    assert (list(response.answer.prediction_set), response.answer.prediction_set_coverage) == ([], 0.0)


def test_the_transformers_node_refuses_a_calibration_of_another_dtype_or_other_weights(spawn, client, tiny_checkpoint,
                                                                                      tmp_path):
    params = dict(backend="transformers", model=str(tiny_checkpoint), device="cpu", max_new_tokens=16,
                  max_pixels=50176, max_input_pixels=320 * 240, use_depth=False, max_image_age=0.0)
    here = CalibrationSetup(model=str(tiny_checkpoint), backend="transformers",
                            checkpoint=checkpoint_fingerprint(str(tiny_checkpoint)), dtype="float32",
                            quantization="none", min_pixels=3136, max_pixels=50176, max_input_pixels=320 * 240,
                            prompt_style="model_card", letters_continue=True)
    # the node reports what it loaded on ~/stats (what `spatialthinker-eval run --node` records), and a
    # calibration of exactly that setup configures
    same = write_calibration(tmp_path / "same.json", "model_card", here)
    proc = spawn(node_command(**params, calibration_file=str(same)), name="same")
    client.wait_for_service(proc, timeout=STARTUP)
    client.wait(lambda: client.stats and client.stats[-1]["backend"]["setup"] is not None, STARTUP,
                "~/stats to report the loaded setup")
    assert client.stats[-1]["backend"]["setup"] == dataclasses.asdict(here)
    assert "cannot configure" not in proc.output()
    proc.stop()
    for name, changed, named in (
            ("dtype", {"dtype": "bfloat16"}, "dtype: calibrated 'bfloat16', here 'float32'"),
            ("weights", {"checkpoint": "sha256:0000000000000000"},
             f"checkpoint: calibrated 'sha256:0000000000000000', here '{here.checkpoint}'")):
        other = write_calibration(tmp_path / f"{name}.json", "model_card", dataclasses.replace(here, **changed))
        refused = spawn(node_command(**params, calibration_file=str(other)), name=name)
        wait_for(lambda: not refused.alive(), STARTUP, "the node to exit after its failed configure")
        assert refused.exit_code() == 1
        assert f"cannot configure: {other} was calibrated with another setup ({named})" in refused.output()
