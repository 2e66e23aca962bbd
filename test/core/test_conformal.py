"""Split conformal calibration (core/conformal.py): the order-statistic threshold, rows needed, coverage over
random calibration/test splits of exchangeable data, prediction sets, and strict calibration files."""

import dataclasses
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from spatialthinker_ros.core.conformal import (Calibration, CalibrationError, CalibrationSetup,
                                               answer_prediction_set, check_setup, conformal_threshold,
                                               nonconformity, prediction_set, rank, read_calibration_file,
                                               rows_needed, setup_differences)
from spatialthinker_ros.core.pipeline import PipelineConfig, finish_result, prepare_request
from spatialthinker_ros.core.types import InferenceResult

SETUP = CalibrationSetup(model="OX-PIXL/SpatialThinker-7B", backend="transformers",
                         checkpoint="sha256:0123456789abcdef", dtype="bfloat16", quantization="none", min_pixels=3136,
                         max_pixels=1003520, max_input_pixels=2073600, prompt_style="model_card", letters_continue=True)
LETTERS = "ABCD"


@pytest.mark.parametrize("numerator, denominator", [(9, 10), (95, 100), (7, 10), (1, 2), (8, 10), (99, 100)])
@pytest.mark.parametrize("n", [1, 3, 9, 10, 19, 20, 57, 100, 401])
def test_threshold_is_the_order_statistic(numerator, denominator, n):
    coverage = numerator / denominator
    k = -(-(n + 1) * numerator // denominator)          # ceil((n+1)(1-alpha)) in integers
    scores = list(np.random.default_rng(n * denominator + numerator).random(n))
    assert rank(n, coverage) == k
    if k > n:
        with pytest.raises(CalibrationError):
            conformal_threshold(scores, coverage)
    else:
        assert conformal_threshold(scores, coverage) == sorted(scores)[k - 1]


@pytest.mark.parametrize("coverage, needed", [(0.9, 9), (0.95, 19), (0.99, 99), (0.8, 4), (0.7, 3), (0.5, 1)])
def test_rows_needed_is_the_smallest_n_with_k_at_most_n(coverage, needed):
    alpha = 1 - Fraction(str(coverage))
    assert needed == math.ceil(1 / alpha) - 1
    assert rows_needed(coverage) == needed
    assert conformal_threshold([0.5] * needed, coverage) == 0.5
    with pytest.raises(CalibrationError, match=f"needs at least {needed} "):
        conformal_threshold([0.5] * (needed - 1), coverage)


def test_too_few_rows_are_refused_with_the_number_needed():
    with pytest.raises(CalibrationError, match=r"8 calibration rows cannot give 0.9 coverage: it needs at least 9"):
        Calibration.fit([0.1] * 8, 0.9, SETUP)
    with pytest.raises(CalibrationError, match="needs at least 19"):
        Calibration.fit([0.1] * 18, 0.95, SETUP)
    for bad in (0.0, 1.0, 1.5, -0.1, float("nan"), True):
        with pytest.raises(CalibrationError, match="coverage must be"):
            conformal_threshold([0.1] * 100, bad)


def _synthetic(rng: np.random.Generator, rows: int, options: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Exchangeable rows: softmax probabilities of random logits, and a true option drawn from a sharpened
    version of them (so the model is informative but miscalibrated)."""
    logits = rng.normal(scale=2.0, size=(rows, options))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    sharp = probabilities ** 2 / (probabilities ** 2).sum(axis=1, keepdims=True)
    truth = np.array([rng.choice(options, p=p) for p in sharp])
    return probabilities, truth


@pytest.mark.parametrize("coverage", [0.8, 0.9, 0.95])
def test_coverage_holds_on_average_over_random_splits(coverage):
    rng = np.random.default_rng(20)
    probabilities, truth = _synthetic(rng, 1000)
    n = 300
    coverages, sizes = [], []
    for _ in range(200):
        order = rng.permutation(len(truth))
        cal, test = order[:n], order[n:]
        calibration = Calibration.fit([nonconformity(probabilities[i], truth[i]) for i in cal], coverage, SETUP)
        sets = [calibration.prediction_set(probabilities[i], LETTERS) for i in test]
        coverages.append(np.mean([LETTERS[truth[i]] in s for i, s in zip(test, sets)]))
        sizes.append(np.mean([len(s) for s in sets]))
    assert np.mean(coverages) >= coverage - 0.01
    # continuous scores have no ties: the coverage is also at most coverage + 1/(n+1), on average
    assert np.mean(coverages) <= coverage + 1 / (n + 1) + 0.01
    assert 0 < np.mean(sizes) < 4            # informative: fewer than every option (sets may be empty)


def test_prediction_set_holds_every_letter_with_p_at_least_one_minus_threshold():
    probabilities = [0.6, 0.25, 0.1, 0.05]
    assert prediction_set(probabilities, LETTERS, 0.4) == ["A"]
    assert prediction_set(probabilities, LETTERS, 0.75) == ["A", "B"]      # 1 - 0.25 = 0.75: boundary is in
    assert prediction_set(probabilities, LETTERS, 0.3) == []               # nothing likely enough: ask for help
    assert prediction_set(probabilities, LETTERS, 1.0) == list(LETTERS)
    # a calibration row's own true option is always in at its own score
    for p in (0.1, 0.3, 0.7, 0.9, 1 / 3):
        assert prediction_set([p, 1 - p], "AB", nonconformity([p, 1 - p], 0))[0] == "A"
    with pytest.raises(ValueError, match="3 probabilities for 4 options"):
        prediction_set([0.5, 0.3, 0.2], LETTERS, 0.5)


def test_answer_prediction_set_without_calibration_or_probabilities_is_empty_with_coverage_zero():
    calibration = Calibration(threshold=0.5, coverage=0.9, n=100, setup=SETUP)
    assert answer_prediction_set([0.7, 0.2, 0.1], "ABC", None) == ([], 0.0)
    assert answer_prediction_set([], "ABC", calibration) == ([], 0.0)
    assert answer_prediction_set([0.7, 0.2, 0.1], "ABC", calibration) == (["A"], 0.9)


def test_setups_compare_field_by_field():
    replay = CalibrationSetup.replay(100000, "model_card")
    assert (replay.model, replay.checkpoint, replay.dtype, replay.max_pixels) == ("replay", "", None, None)
    assert setup_differences(SETUP, SETUP) is None
    other = dataclasses.replace(SETUP, checkpoint="sha256:fedcba9876543210", dtype="float32", quantization="4bit",
                                max_pixels=401408, prompt_style="plain")
    assert setup_differences(SETUP, other) == (
        "checkpoint: calibrated 'sha256:0123456789abcdef', here 'sha256:fedcba9876543210'; "
        "dtype: calibrated 'bfloat16', here 'float32'; quantization: calibrated 'none', here '4bit'; "
        "max_pixels: calibrated 1003520, here 401408; prompt_style: calibrated 'model_card', here 'plain'")


def test_calibration_file_round_trips(tmp_path: Path):
    calibration = Calibration.fit([0.05 * i for i in range(20)], 0.9, SETUP)
    assert calibration.threshold == sorted(0.05 * i for i in range(20))[18]
    path = tmp_path / "calibration.json"
    calibration.save(path, runs=["eval/a"])
    data = json.loads(path.read_text())
    assert {k: data[k] for k in ("threshold", "coverage", "n", "runs")} == {
        "threshold": calibration.threshold, "coverage": 0.9, "n": 20, "runs": ["eval/a"]}
    assert data["setup"] == {"model": SETUP.model, "backend": "transformers", "checkpoint": "sha256:0123456789abcdef",
                             "dtype": "bfloat16", "quantization": "none", "min_pixels": 3136, "max_pixels": 1003520,
                             "max_input_pixels": 2073600, "prompt_style": "model_card", "letters_continue": True}
    assert Calibration.load(path) == calibration


GOOD = Calibration(threshold=0.4, coverage=0.9, n=50, setup=SETUP).to_json()
_DROP = object()


def _with(**changes) -> dict:
    data = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if value is _DROP:
            data.pop(key)
        else:
            data[key] = value
    return data


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not JSON"),
    ("[1, 2]", "not a calibration file"),
    (json.dumps(_with(format="other")), "not a calibration file"),
    (json.dumps(_with(version=4)), "calibration file version 4"),
    (json.dumps(_with(threshold=_DROP)), "missing threshold"),
    (json.dumps(_with(setup=_DROP, n=_DROP)), "missing n, setup"),
    (json.dumps(_with(threshold=1.5)), "threshold must be a number in"),
    (json.dumps(_with(threshold="0.4")), "threshold must be a number in"),
    (json.dumps(_with(coverage=1.0)), "coverage must be a number strictly between 0 and 1"),
    (json.dumps(_with(n=5)), "n must be an integer of at least 9 rows"),
    (json.dumps(_with(n=50.0)), "n must be an integer"),
    (json.dumps(_with(n=True)), "n must be an integer"),
    (json.dumps(_with(setup={**GOOD["setup"], "device": "cuda"})), "this version reads 3 with model, backend"),
    (json.dumps(_with(setup={k: v for k, v in GOOD["setup"].items() if k != "model"})), "its setup lacks model "),
    (json.dumps(_with(setup={**GOOD["setup"], "dtype": 16})), "setup.dtype has the wrong type"),
    (json.dumps(_with(setup={**GOOD["setup"], "letters_continue": "yes"})), "setup.letters_continue has the wrong type"),
    (json.dumps(_with(setup={**GOOD["setup"], "max_pixels": "1003520"})), "setup.max_pixels has the wrong type"),
    (json.dumps(_with(setup={**GOOD["setup"], "model": ""})), "setup.model has the wrong type"),
])
def test_load_refuses_malformed_files(tmp_path: Path, content, message):
    path = tmp_path / "calibration.json"
    path.write_text(content)
    with pytest.raises(CalibrationError, match=message) as raised:
        Calibration.load(path)
    assert str(path) in str(raised.value)


def test_load_names_a_missing_file(tmp_path: Path):
    with pytest.raises(CalibrationError, match="cannot read calibration file .*nothing.json"):
        Calibration.load(tmp_path / "nothing.json")


FIRST_SETUP = {"model": SETUP.model, "backend": "transformers", "max_pixels": 1003520, "max_input_pixels": 2073600,
               "prompt_style": "model_card"}
# the second version recorded whether prompts were cached, which does not decide which answers get probabilities
SECOND_SETUP = {**FIRST_SETUP, "checkpoint": "sha256:0123456789abcdef", "dtype": "bfloat16", "quantization": "none",
                "min_pixels": 3136, "prompt_cache": True}


@pytest.mark.parametrize("version, setup, lacking", [
    (1, FIRST_SETUP, "checkpoint, dtype, quantization, min_pixels, letters_continue"),
    (2, SECOND_SETUP, "letters_continue")])
def test_a_file_of_an_earlier_version_is_refused_naming_the_fields_it_lacks(version, setup, lacking, tmp_path: Path):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(_with(version=version, setup=setup)))
    with pytest.raises(CalibrationError, match=rf"its setup lacks {lacking} \(a calibration file of version {version}"):
        read_calibration_file(str(path))


def test_a_calibration_is_checked_against_the_setup_that_will_answer(tmp_path: Path):
    path = tmp_path / "calibration.json"
    Calibration(threshold=0.4, coverage=0.9, n=50, setup=SETUP).save(path)
    assert read_calibration_file("") is None
    calibration = read_calibration_file(str(path))
    assert calibration.threshold == 0.4
    check_setup(calibration, str(path), SETUP)
    check_setup(None, "", SETUP)
    here = dataclasses.replace(SETUP, dtype="float32")
    with pytest.raises(CalibrationError, match=r"calibration.json was calibrated with another setup \(dtype: "
                                               r"calibrated 'bfloat16', here 'float32'\); recalibrate"):
        check_setup(calibration, str(path), here)


def test_finish_result_gives_the_calibrated_set_of_the_answer():
    image = np.zeros((56, 56, 3), np.uint8)
    options = ["left of", "right of", "behind"]
    request = prepare_request(image, "Where is the cup?", options)

    def output(*probabilities: float) -> InferenceResult:
        return InferenceResult(text="<answer> (A) left of </answer>", option_probabilities=probabilities)

    calibrated = PipelineConfig(calibration=Calibration(threshold=0.75, coverage=0.9, n=100, setup=SETUP))
    result = finish_result(request, output(0.6, 0.3, 0.1), options, camera_size=(56, 56), config=calibrated)
    assert (result.prediction_set, result.prediction_set_coverage) == (("A", "B"), 0.9)
    # no calibration, no probabilities, or probabilities for other options: no set, coverage 0
    for config, probabilities in ((PipelineConfig(), (0.6, 0.3, 0.1)), (calibrated, ()), (calibrated, (0.6, 0.4))):
        result = finish_result(request, output(*probabilities), options, camera_size=(56, 56), config=config)
        assert (result.prediction_set, result.prediction_set_coverage) == ((), 0.0)
    # options inline in the question count as options
    inline = prepare_request(image, "Where is the cup? (A) left (B) right", [])
    result = finish_result(inline, output(0.2, 0.8), [], camera_size=(56, 56), config=calibrated)
    assert result.prediction_set == ("B",)


def test_an_answer_made_after_the_out_of_memory_retry_gets_no_set():
    image = np.zeros((56, 56, 3), np.uint8)
    options = ["left of", "right of"]
    request = prepare_request(image, "Where is the cup?", options)
    output = InferenceResult(text="<answer> (A) left of </answer>", option_probabilities=(0.9, 0.1))
    calibrated = PipelineConfig(calibration=Calibration(threshold=0.5, coverage=0.9, n=100, setup=SETUP))
    whole = finish_result(request, output, options, camera_size=(56, 56), config=calibrated)
    assert (whole.prediction_set, whole.prediction_set_coverage) == (("A",), 0.9)
    retried = finish_result(request, output, options, camera_size=(56, 56), config=calibrated, retried=True)
    assert (retried.prediction_set, retried.prediction_set_coverage) == ((), 0.0)
    assert retried.parsed.option_probabilities == (0.9, 0.1)    # the probabilities stay; only the set goes
    assert "no prediction set: answered at a smaller image size after running out of memory" in \
        retried.parsed.status_message


def test_the_set_is_the_one_a_planner_recomputes_from_the_float32_message():
    # the threshold sits exactly at float32(0.4): 0.400000003 rounds up to it in the message, so it is in the set
    # a planner computes from the message (1 - p <= threshold), though below it in float64
    carried = float(np.float32(0.4))
    threshold = 1 - carried
    p = 0.400000003
    assert 1 - p > threshold and float(np.float32(p)) == carried
    calibration = Calibration(threshold=threshold, coverage=0.9, n=100, setup=SETUP)
    message = [float(np.float32(v)) for v in (p, 1 - p)]
    planner = [letter for letter, v in zip("AB", message) if 1 - v <= threshold]
    assert answer_prediction_set([p, 1 - p], "AB", calibration) == (planner, 0.9) == (["A", "B"], 0.9)
