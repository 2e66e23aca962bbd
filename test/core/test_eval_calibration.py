"""spatialthinker-eval's calibration figures and pictures on a run with known option probabilities,
`spatialthinker-eval calibrate` end to end on handwritten run folders, and `spatialthinker-ask --calibration`,
as installed."""

import dataclasses
import json
import math
import subprocess
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pytest

import eval_data

import spatialthinker_ros
from spatialthinker_ros.core.conformal import Calibration, CalibrationSetup
from spatialthinker_ros.evaluation.calibration import (ScoredRow, accuracy_by_share_answered, auroc,
                                                       selective_accuracy)
from spatialthinker_ros.testing.processes import installed_executable

pytestmark = pytest.mark.timeout(300)

EVAL = installed_executable("spatialthinker-eval")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# eval_data.ROWS with probabilities in option order. Row 6 (no <answer>) has none. Confidence is the chosen
# option's probability; row 3's answer names no option: it has no confidence and is counted apart. Each other
# row's confidence, right or wrong, and 15-bin index ((m-1)/15, m/15]:
#   r0 0.70 right (bin 10), r1 0.62 right (9), r2 0.85 right (12), r4 0.95 right (14),
#   r5 0.72 wrong (10; chose A, key B), r7 0.55 right (8), r8 0.90 right (13)
PROBABILITIES = {
    "r0": [0.7, 0.1, 0.1, 0.1], "r1": [0.1, 0.62, 0.18, 0.1], "r2": [0.05, 0.05, 0.85, 0.05],
    "r3": [0.25, 0.25, 0.25, 0.25], "r4": [0.95, 0.05], "r5": [0.72, 0.28], "r7": [0.55, 0.45], "r8": [0.1, 0.9],
}
# ECE: bin 10 holds r0 and r5: accuracy 0.5, confidence 0.71; every other bin one row.
#   (|1-.62| + 2 * |.5-.71| + |1-.85| + |1-.95| + |1-.55| + |1-.9|) / 7 = 1.55 / 7
ECE = 1.55 / 7
# Brier over the options, per row sum of (p_j - [j = key])^2: .12, .1968, .03, .005, 1.0368, .405, .02
BRIER_OVER_OPTIONS = (0.12 + 0.1968 + 0.03 + 0.005 + 1.0368 + 0.405 + 0.02) / 7
# Brier of the chosen option, (confidence - right)^2: .09, .1444, .0225, .0025, .5184, .2025, .01
BRIER_OF_CHOICE = (0.09 + 0.1444 + 0.0225 + 0.0025 + 0.5184 + 0.2025 + 0.01) / 7
# AUROC: 6 right x 1 wrong (.72); three (.85, .95, .9) beat it: 3 / 6
AUROC = 3 / 6
# most confident first: .95 R, .9 R, .85 R, .72 W, .7 R, .62 R, .55 R
SELECTIVE = {"0.5": 3 / 4, "0.8": 5 / 6}


def run_eval(*args, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(EVAL), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    image = cv2.imread(str(path))
    assert image is not None and image.shape[0] > 100 and image.shape[1] > 100, path
    assert image.std() > 10, f"{path} is blank"


def test_run_reports_calibration_figures_exactly_and_draws_both_pictures(tmp_path: Path):
    path, questions = eval_data.project_jsonl(tmp_path)
    replay = eval_data.write_replay(tmp_path / "replay.jsonl", questions)
    lines = [json.loads(line) for line in replay.read_text().splitlines()]
    replay.write_text("".join(json.dumps({k: v for k, v in line.items() if k != "option_probabilities"}) + "\n"
                              for line in lines))
    out = tmp_path / "out"
    command = ("run", path, "--out", out, "--backend", "replay", "--replay-file", replay, "--no-progress")
    done = run_eval(*command)
    assert done.returncode == 0, done.stderr
    # replay lines without probabilities: no figures, a reason, no pictures
    calibration = json.loads((out / "summary.json").read_text())["calibration"]
    assert calibration["rows"] == 0 and calibration["ece"] is None and calibration["brier_over_options"] is None
    assert calibration["rows_left_out"] == {"no probabilities": 9}
    assert "no scored row carries option probabilities" in calibration["reason"]
    assert "No calibration figures: no scored row carries option probabilities" in (out / "summary.md").read_text()
    assert not (out / "reliability.png").exists() and not (out / "accuracy_share_answered.png").exists()

    # the same run's rows as a backend with probabilities writes them; a rerun asks nothing and re-summarises
    log = out / "predictions.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    for record in records:
        if record["index"] in PROBABILITIES:
            record["option_probabilities"] = PROBABILITIES[record["index"]]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    again = run_eval(*command)
    assert again.returncode == 0, again.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["correct"] == 6 and len(log.read_text().splitlines()) == 9     # nothing asked again
    calibration = summary["calibration"]
    assert calibration["rows"] == 7 and calibration["rows_left_out"] == {"no probabilities": 1}
    assert calibration["rows_without_choice"] == 1
    assert calibration["reason"] is None and calibration["ece_bins"] == 15
    assert calibration["ece"] == pytest.approx(ECE, abs=1e-12)
    assert calibration["brier_over_options"] == pytest.approx(BRIER_OVER_OPTIONS, abs=1e-12)
    assert calibration["brier_of_choice"] == pytest.approx(BRIER_OF_CHOICE, abs=1e-12)
    assert calibration["auroc"] == pytest.approx(AUROC, abs=1e-12)
    assert calibration["selective_accuracy"] == pytest.approx(SELECTIVE, abs=1e-12)
    filled = {m: (b["rows"], b["accuracy"]) for m, b in enumerate(calibration["bins"]) if b["rows"]}
    assert filled == {8: (1, 1.0), 9: (1, 1.0), 10: (2, 0.5), 12: (1, 1.0), 13: (1, 1.0), 14: (1, 1.0)}
    assert calibration["bins"][10]["confidence"] == pytest.approx(0.71)
    markdown = (out / "summary.md").read_text()
    assert ("## Option probabilities (7 scored rows; 1 more name no option (no confidence: not in these figures); "
            "left out: 1 no probabilities)") in markdown
    assert f"| expected calibration error (15 bins) | {ECE:.4f} |" in markdown
    assert f"| Brier score over the options (sum over options of (p - right)^2; 0 best, 2 worst) | " \
           f"{BRIER_OVER_OPTIONS:.4f} |" in markdown
    assert f"| Brier score of the chosen option ((p - right)^2; 0 best, 1 worst) | {BRIER_OF_CHOICE:.4f} |" in markdown
    assert "| accuracy with the most confident 80 % answered (share answered) | 83.3 % |" in markdown
    assert "coverage" not in markdown     # the word is kept for prediction sets
    assert_png(out / "reliability.png")
    assert_png(out / "accuracy_share_answered.png")


def _rows(*pairs) -> list:
    """ScoredRows of (confidence, right), two options, the chosen one first."""
    return [ScoredRow(index=str(i), probabilities=(c, 1 - c), key=0 if right else 1, choice=0, correct=right)
            for i, (c, right) in enumerate(pairs)]


def test_auroc_and_selective_accuracy_average_over_ties():
    # all four tied: AUROC 1/2 whatever the order; the most confident half has the tie's accuracy, 1/2
    tied = _rows((0.7, True), (0.7, False), (0.7, True), (0.7, False))
    assert auroc(tied) == 0.5 and auroc(list(reversed(tied))) == 0.5
    assert selective_accuracy(tied, 0.5) == 0.5 == selective_accuracy(list(reversed(tied)), 0.5)
    # .9 R, then .6 R and .6 W tied, then .2 W: right beats wrong in 1 + 1 + 0.5 + 1 = 3.5 of 4 pairs
    mixed = _rows((0.6, False), (0.9, True), (0.2, False), (0.6, True))
    assert auroc(mixed) == 3.5 / 4
    assert accuracy_by_share_answered(mixed) == pytest.approx([1.0, 0.75, 2 / 3, 0.5])
    rng = np.random.default_rng(3)     # a rank-based AUROC at 20,000 rows takes milliseconds
    many = _rows(*zip(rng.random(20000).round(2), rng.random(20000) < 0.7))
    assert 0.4 < auroc(many) < 0.6


def test_a_drawing_that_fails_loses_no_summary(tmp_path: Path, monkeypatch, capsys):
    from spatialthinker_ros.evaluation import cli as eval_cli

    path, questions = eval_data.project_jsonl(tmp_path)
    replay = eval_data.write_replay(tmp_path / "replay.jsonl", questions)

    def broken(rows, folder):
        raise MemoryError("no memory for the figure")

    monkeypatch.setattr(eval_cli, "write_pictures", broken)
    out = tmp_path / "out"
    assert eval_cli.main(["run", str(path), "--out", str(out), "--backend", "replay", "--replay-file", str(replay),
                          "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["scored"] == 9
    assert "# Evaluation of replay" in (out / "summary.md").read_text()
    assert "the pictures could not be drawn (MemoryError: no memory for the figure)" in capsys.readouterr().err


# ---- calibrate ----------------------------------------------------------------------------------------------

RUN_SETUP = {"data": ["mine.jsonl"], "format": "jsonl", "node": None, "backend": "transformers",
             "model": "OX-PIXL/SpatialThinker-7B", "replay_file": None, "prompt_style": "model_card",
             "max_input_pixels": 2073600, "max_pixels": None, "max_new_tokens": 2048}
_DROP = object()   # a run.json key left out
ANSWERING = dataclasses.asdict(CalibrationSetup(
    model="OX-PIXL/SpatialThinker-7B", backend="transformers", checkpoint="sha256:0123456789abcdef", dtype="bfloat16",
    quantization="none", min_pixels=3136, max_pixels=1003520, max_input_pixels=2073600, prompt_style="model_card",
    letters_continue=True))


def write_run(folder: Path, rows: list[tuple[list[float], str]], run: Optional[dict] = None, retried: int = 0,
              questions: str = "", **setup) -> Path:
    """A spatialthinker-eval --out folder: run.json (RUN_SETUP with `run`, its calibration_setup ANSWERING with
    `setup`), and one answered row per (probabilities, key), choosing the most probable option, the first `retried`
    of them after the out-of-memory retry; plus a skipped row and a failed one, which calibration must ignore. The
    questions are "{questions} Q{i}?", `questions` the folder's name unless given (the same rows in two runs)."""
    folder.mkdir(parents=True)
    recorded = RUN_SETUP | {"calibration_setup": ANSWERING | setup, "calibration_setup_problem": ""} | (run or {})
    (folder / "run.json").write_text(json.dumps({k: v for k, v in recorded.items() if v is not _DROP}))
    with (folder / "predictions.jsonl").open("w") as out:
        for i, (probabilities, key) in enumerate(rows):
            letters = [chr(65 + j) for j in range(len(probabilities))]
            choice = letters[int(np.argmax(probabilities))]
            out.write(json.dumps({"index": f"q{i}", "category": "c", "question": f"{questions or folder.name} Q{i}?",
                                  "options": [f"o{j}" for j in letters], "answer": key, "choice": choice,
                                  "correct": choice == key, "status": "complete",
                                  "option_probabilities": probabilities, "retried": i < retried}) + "\n")
        out.write(json.dumps({"index": "skip", "category": "", "skipped": "bad image"}) + "\n")
        out.write(json.dumps({"index": "fail", "category": "c", "question": "Q?", "options": ["a", "b"],
                              "answer": "A", "choice": "", "correct": False, "error": "timeout"}) + "\n")
    return folder


def synthetic_rows(seed: int, n: int) -> list[tuple[list[float], str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        logits = rng.normal(scale=2.0, size=4)
        p = np.exp(logits) / np.exp(logits).sum()
        rows.append(([float(v) for v in p], chr(65 + int(rng.choice(4, p=p)))))
    return rows


def test_calibrate_writes_the_order_statistic_threshold_of_all_runs(tmp_path: Path):
    first, second = synthetic_rows(1, 120), synthetic_rows(2, 80)
    runs = [write_run(tmp_path / "a", first), write_run(tmp_path / "b", second)]
    out = tmp_path / "calibration.json"
    done = run_eval("calibrate", *runs, "--coverage", "0.9", "--out", out)
    assert done.returncode == 0, done.stderr
    scores = sorted(1 - p[ord(key) - 65] for p, key in first + second)
    k = math.ceil(201 * 9 / 10)       # 181
    calibration = Calibration.load(out)
    assert (calibration.n, calibration.coverage, calibration.threshold) == (200, 0.9, scores[k - 1])
    assert calibration.setup.max_pixels == 1003520 and calibration.setup.model == "OX-PIXL/SpatialThinker-7B"
    assert json.loads(out.read_text())["runs"] == [str(r) for r in runs]
    assert "calibrated on 200 rows of 2 run(s); left out 2 rows: no probabilities" in done.stdout
    assert f"threshold {scores[k - 1]:.6g}" in done.stdout


def test_calibrate_refuses_runs_of_other_setups_and_too_few_rows(tmp_path: Path):
    base = write_run(tmp_path / "a", synthetic_rows(1, 50))
    other = write_run(tmp_path / "b", synthetic_rows(2, 50), max_pixels=401408)
    out = tmp_path / "calibration.json"
    refused = run_eval("calibrate", base, other, "--out", out)
    assert refused.returncode == 2
    assert f"{other} was run with another setup than {base} (max_pixels: {base} 1003520, {other} 401408)" \
        in " ".join(refused.stderr.split())
    assert not out.exists()

    few = write_run(tmp_path / "few", synthetic_rows(3, 18))
    refused = run_eval("calibrate", few, "--coverage", "0.95", "--out", out)
    assert refused.returncode == 2
    assert "18 calibration rows cannot give 0.95 coverage: it needs at least 19" in refused.stderr
    assert run_eval("calibrate", few, "--coverage", "0.9", "--out", out).returncode == 0

    # a --node run calibrates with the setup the node reported; runs that recorded none are refused, saying why
    node = write_run(tmp_path / "node", synthetic_rows(4, 50), run={"backend": "node", "model": None}, dtype="float32")
    assert run_eval("calibrate", node, "--out", out).returncode == 0
    assert Calibration.load(out).setup.dtype == "float32"
    older = write_run(tmp_path / "older", synthetic_rows(5, 50), run={"calibration_setup": _DROP})
    refused = run_eval("calibrate", older, "--out", out)
    assert refused.returncode == 2 and "records no calibration setup (a run of an earlier version" in refused.stderr
    unknown = write_run(tmp_path / "unknown", synthetic_rows(6, 50),
                        run={"calibration_setup": None, "calibration_setup_problem": "no config.json"})
    refused = run_eval("calibrate", unknown, "--out", out)
    assert refused.returncode == 2 and "could not record what answered it (no config.json)" in refused.stderr
    refused = run_eval("calibrate", tmp_path / "nothing", "--out", out)
    assert refused.returncode == 2 and "holds no run.json" in refused.stderr
    refused = run_eval("calibrate", base, "--coverage", "1", "--out", out)
    assert refused.returncode == 2 and "coverage must be a number strictly between 0 and 1" in refused.stderr


def test_calibrate_reports_coverage_and_set_sizes_on_held_out_runs(tmp_path: Path):
    # 9 calibration rows, key always A, p(A) = 0.1 .. 0.9: scores 0.9 .. 0.1; k = ceil(10 * 0.9) = 9: q = 0.9
    calibration_rows = [([p, 1 - p], "A") for p in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)]
    cal = write_run(tmp_path / "cal", calibration_rows)
    # sets hold options with p >= 0.1 (up to rounding: 1 - 0.9 is 0.0999...)
    test_rows = [([0.95, 0.05], "A"),          # {A}: covered, singleton
                 ([0.5, 0.5], "B"),            # {A, B}: covered
                 ([0.02, 0.98], "A"),          # {B}: missed, singleton
                 ([0.3, 0.3, 0.4], "C")]       # {A, B, C}: covered
    test = write_run(tmp_path / "test", test_rows)
    out = tmp_path / "calibration.json"
    done = run_eval("calibrate", cal, "--coverage", "0.9", "--out", out, "--test", test)
    assert done.returncode == 0, done.stderr
    assert Calibration.load(out).threshold == pytest.approx(0.9)
    assert ("held-out: 4 rows, coverage 0.7500 (target 0.9), mean set size 1.750, singleton sets 0.5000, "
            "empty sets 0.0000") in done.stdout

    other = write_run(tmp_path / "other", test_rows, prompt_style="plain")
    refused = run_eval("calibrate", cal, "--out", out, "--test", other)
    assert refused.returncode == 2
    assert "the --test runs have another setup (prompt_style: calibrated 'model_card', --test 'plain')" \
        in " ".join(refused.stderr.split())
    refused = run_eval("calibrate", cal, "--out", out, "--test", cal)
    assert refused.returncode == 2 and "the --test runs share 9 row(s) with the calibration runs" in refused.stderr
    copy = write_run(tmp_path / "copy", calibration_rows[:3], questions="cal")   # the same questions of the same file
    refused = run_eval("calibrate", cal, "--out", out, "--test", copy)
    assert refused.returncode == 2 and "the --test runs share 3 row(s)" in refused.stderr


def test_calibrate_counts_each_row_once_and_leaves_out_rows_answered_after_the_retry(tmp_path: Path):
    rows = synthetic_rows(7, 5)
    run = write_run(tmp_path / "a", rows)
    out = tmp_path / "calibration.json"
    # `calibrate a a`: 5 rows, not 10, so not enough for 0.9
    refused = run_eval("calibrate", run, run, "--coverage", "0.9", "--out", out)
    assert refused.returncode == 2 and "5 calibration rows cannot give 0.9 coverage" in refused.stderr
    many = synthetic_rows(8, 40)
    first, again = write_run(tmp_path / "b", many, retried=4), write_run(tmp_path / "c", many, questions="b")
    done = run_eval("calibrate", first, again, "--coverage", "0.9", "--out", out)
    assert done.returncode == 0, done.stderr
    assert Calibration.load(out).n == 40     # the 4 retried rows of b are counted from c, where they were not
    assert "left out 4 rows: answered after the out-of-memory retry" in done.stdout
    assert "left out 36 rows: counted already (the same row in another run)" in done.stdout


# ---- spatialthinker-ask --calibration -------------------------------------------------------------------------

ASK = installed_executable("spatialthinker-ask")


def test_ask_checks_the_calibration_against_its_settings_and_prints_the_set(tmp_path: Path):
    data = Path(spatialthinker_ros.__file__).parent / "data"
    meta = json.loads((data / "sample_scene.json").read_text())
    question = meta["questions"][0]
    command = [str(ASK), "--backend", "replay", "--replay-file", str(data / meta["replay_file"]),
               "--image", str(data / meta["image"]), "--question", question["question"],
               "--options", *question["options"], "--max-input-pixels", "307200"]
    path = tmp_path / "calibration.json"
    Calibration(threshold=0.6, coverage=0.9, n=300,
                setup=CalibrationSetup.replay(307200, "model_card")).save(path)
    done = subprocess.run([*command, "--calibration", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    # the recorded probabilities are 0.82, 0.05, 0.09, 0.04: only A reaches 1 - 0.6
    assert answer["option_probabilities"] == [0.82, 0.05, 0.09, 0.04]
    assert answer["choice"] == "A" and (answer["prediction_set"], answer["prediction_set_coverage"]) == (["A"], 0.9)

    refused = subprocess.run([*command[:-1], "1003520", "--calibration", str(path)], capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2 and refused.stdout == ""
    assert ("was calibrated with another setup (max_input_pixels: calibrated 307200, here 1003520)"
            in " ".join(refused.stderr.split()))
    path.write_text("{}")
    refused = subprocess.run([*command, "--calibration", str(path)], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "not a calibration file" in refused.stderr
