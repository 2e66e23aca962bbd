"""How far a run's option probabilities can be trusted, and split conformal calibration from runs.

Works on predictions.jsonl records (evaluation.runner) that carry `option_probabilities`: floats in option
order, summing to 1; absent or empty when the backend gave none. Only scored rows count. A row's confidence is
the probability of the option its answer chose; an answer that names no option is wrong and has confidence 0
(nothing in the probabilities backs it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from spatialthinker_ros.core.conformal import (SETUP_FIELDS, Calibration, CalibrationError, CalibrationSetup,
                                               nonconformity, setup_differences)
from spatialthinker_ros.core.prompt import option_letter
from spatialthinker_ros.evaluation.runner import read_predictions
from spatialthinker_ros.evaluation.scoring import is_scored, latest_records

ECE_BINS = 15
SELECTIVE_FRACTIONS = (0.5, 0.8)
RELIABILITY_PNG = "reliability.png"
ACCURACY_COVERAGE_PNG = "accuracy_coverage.png"


@dataclass(frozen=True)
class ScoredRow:
    """One scored row with probabilities: the probabilities, the key's and the chosen option's index."""

    index: str
    probabilities: tuple[float, ...]
    key: int
    choice: Optional[int]          # None: the answer names no option
    correct: bool

    @property
    def confidence(self) -> float:
        return 0.0 if self.choice is None else self.probabilities[self.choice]


def _letters(n: int) -> list[str]:
    return [option_letter(i) for i in range(n)]


def rows_with_probabilities(records: dict[str, dict[str, Any]]) -> tuple[list[ScoredRow], dict[str, int]]:
    """The scored rows that carry usable probabilities, and counts of the scored rows left out, by reason."""
    rows, left_out = [], {"no probabilities": 0, "probabilities do not match the options": 0}
    for record in records.values():
        if not is_scored(record):
            continue
        probabilities = record.get("option_probabilities") or []
        options = record.get("options") or []
        if not probabilities:
            left_out["no probabilities"] += 1
            continue
        letters = _letters(len(options)) if len(options) <= 26 else []
        if (len(probabilities) != len(options) or record.get("answer") not in letters
                or not all(isinstance(p, (int, float)) and 0 <= p <= 1 for p in probabilities)):
            left_out["probabilities do not match the options"] += 1
            continue
        choice = record.get("choice") or ""
        rows.append(ScoredRow(index=str(record["index"]), probabilities=tuple(float(p) for p in probabilities),
                              key=letters.index(record["answer"]),
                              choice=letters.index(choice) if choice in letters else None,
                              correct=bool(record.get("correct"))))
    return rows, {reason: count for reason, count in left_out.items() if count}


# ---- metrics ----------------------------------------------------------------------------------------------


def reliability_bins(rows: Sequence[ScoredRow], bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """Equal-width confidence bins ((m-1)/M, m/M] (a confidence of 0 in the first): rows, accuracy, mean
    confidence; accuracy and confidence are None for an empty bin."""
    members: list[list[ScoredRow]] = [[] for _ in range(bins)]
    for row in rows:
        members[min(bins - 1, max(0, math.ceil(row.confidence * bins) - 1))].append(row)
    return [{"lower": m / bins, "upper": (m + 1) / bins, "rows": len(group),
             "accuracy": sum(r.correct for r in group) / len(group) if group else None,
             "confidence": sum(r.confidence for r in group) / len(group) if group else None}
            for m, group in enumerate(members)]


def expected_calibration_error(rows: Sequence[ScoredRow], bins: int = ECE_BINS) -> float:
    """Sum over bins of |B|/n * |accuracy(B) - confidence(B)| (Guo et al. 2017)."""
    return sum(b["rows"] / len(rows) * abs(b["accuracy"] - b["confidence"])
               for b in reliability_bins(rows, bins) if b["rows"])


def brier_score(rows: Sequence[ScoredRow]) -> float:
    """Mean over rows of the sum over options of (p_j - [j is the key])^2: 0 is perfect, 2 the worst."""
    return sum(sum((p - (j == row.key)) ** 2 for j, p in enumerate(row.probabilities)) for row in rows) / len(rows)


def auroc(rows: Sequence[ScoredRow]) -> Optional[float]:
    """The probability that a random right row has a higher confidence than a random wrong one (ties count
    half; Mann-Whitney). None when every row is right, or every row wrong."""
    right = [r.confidence for r in rows if r.correct]
    wrong = [r.confidence for r in rows if not r.correct]
    if not right or not wrong:
        return None
    wins = sum((a > b) + 0.5 * (a == b) for a in right for b in wrong)
    return wins / (len(right) * len(wrong))


def accuracy_coverage(rows: Sequence[ScoredRow]) -> list[float]:
    """Accuracy of the m most confident rows, for m = 1..n (ties in the order the rows came)."""
    ordered = sorted(rows, key=lambda r: -r.confidence)
    curve, right = [], 0
    for m, row in enumerate(ordered, start=1):
        right += row.correct
        curve.append(right / m)
    return curve


def selective_accuracy(rows: Sequence[ScoredRow], fraction: float) -> float:
    """Accuracy of the most confident ceil(fraction * n) rows."""
    return accuracy_coverage(rows)[max(1, math.ceil(fraction * len(rows))) - 1]


def calibration_summary(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """summary.json's "calibration": the metrics over scored rows with probabilities; None with a reason
    when there are none."""
    rows, left_out = rows_with_probabilities(records)
    summary: dict[str, Any] = {"rows": len(rows), "rows_left_out": left_out, "ece_bins": ECE_BINS}
    if not rows:
        reason = ("no scored row carries option probabilities (the backend gave none, or no row was scored)"
                  if not left_out.keys() - {"no probabilities"} else
                  "no scored row carries option probabilities that match its options")
        return summary | {"reason": reason, "ece": None, "brier": None, "auroc": None,
                          "selective_accuracy": None, "bins": None}
    return summary | {
        "reason": None,
        "ece": expected_calibration_error(rows),
        "brier": brier_score(rows),
        "auroc": auroc(rows),
        "selective_accuracy": {f"{fraction:g}": selective_accuracy(rows, fraction)
                               for fraction in SELECTIVE_FRACTIONS},
        "bins": reliability_bins(rows),
    }


def calibration_markdown(calibration: dict[str, Any]) -> list[str]:
    """summary.md lines of calibration_summary's figures."""
    left = ", ".join(f"{count} {reason}" for reason, count in calibration["rows_left_out"].items())
    left = f"; left out: {left}" if left else ""
    head = ["", f"## Option probabilities ({calibration['rows']} scored rows{left})", ""]
    if calibration["reason"]:
        return head + [f"No calibration figures: {calibration['reason']}."]
    auc, selective = calibration["auroc"], calibration["selective_accuracy"]
    return head + [
        "| figure | value |", "|---|---:|",
        f"| expected calibration error ({calibration['ece_bins']} bins) | {calibration['ece']:.4f} |",
        f"| Brier score | {calibration['brier']:.4f} |",
        f"| AUROC of the chosen option's probability for right answers | {'-' if auc is None else f'{auc:.4f}'} |",
        *[f"| accuracy of the most confident {100 * float(f):g} % | {100 * a:.1f} % |" for f, a in selective.items()],
        "", f"Pictures: {RELIABILITY_PNG}, {ACCURACY_COVERAGE_PNG}.",
    ]


def write_pictures(rows: Sequence[ScoredRow], folder: Path) -> list[Path]:
    """The reliability diagram and the accuracy-vs-coverage curve as PNGs (matplotlib's Agg canvas, no
    display and no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bins = [b for b in reliability_bins(rows) if b["rows"]]
    reliability = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(reliability)
    ax = reliability.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.bar([b["lower"] for b in bins], [b["accuracy"] for b in bins], width=1 / ECE_BINS, align="edge",
           edgecolor="black", alpha=0.7, label="accuracy per bin")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="black",
            label="(mean confidence, accuracy)")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (probability of the chosen option)", ylabel="accuracy",
           title=f"Reliability, {len(rows)} rows, ECE {expected_calibration_error(rows):.3f}")
    ax.legend(loc="upper left", fontsize="small")

    curve = accuracy_coverage(rows)
    selective = Figure(figsize=(5, 4), dpi=100)
    FigureCanvasAgg(selective)
    ax = selective.add_subplot()
    ax.plot([m / len(rows) for m in range(1, len(rows) + 1)], curve, drawstyle="steps-post")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="coverage (share of rows answered, most confident first)",
           ylabel="accuracy of the rows answered", title=f"Accuracy vs coverage, {len(rows)} rows")
    ax.grid(alpha=0.3)
    paths = [folder / RELIABILITY_PNG, folder / ACCURACY_COVERAGE_PNG]
    for figure, path in zip((reliability, selective), paths):
        figure.savefig(path, format="png")
    return paths


# ---- conformal calibration from runs ----------------------------------------------------------------------


class RunError(ValueError):
    """A run folder that cannot be calibrated from (missing files, no setup, setups that differ)."""


def run_setup(folder: Path) -> CalibrationSetup:
    """The setup a spatialthinker-eval run recorded in its run.json."""
    path = folder / "run.json"
    try:
        recorded = json.loads(path.read_text())
    except OSError:
        raise RunError(f"{folder} holds no run.json (not a spatialthinker-eval --out folder)") from None
    except ValueError as exc:
        raise RunError(f"{path} is not JSON ({exc})") from None
    if recorded.get("backend") == "node":
        raise RunError(f"{folder} is a --node run: its run.json does not record the node's model and image "
                       "settings, which a calibration must hold for; calibrate from a run with the same backend "
                       "options in-process (or an openai run against the same server)")
    try:
        return CalibrationSetup.of(**{name: recorded[name] for name in SETUP_FIELDS})
    except KeyError as exc:
        raise RunError(f"{path} does not record {exc.args[0]}") from None


def runs_rows(folders: Sequence[Path]) -> tuple[CalibrationSetup, list[ScoredRow], dict[str, int]]:
    """The one setup of the runs (RunError when they differ), their scored rows with probabilities, and the
    scored rows left out, by reason."""
    setup: Optional[CalibrationSetup] = None
    rows: list[ScoredRow] = []
    left_out: dict[str, int] = {}
    for folder in folders:
        this = run_setup(folder)
        if setup is not None and (difference := setup_differences(setup, this, (str(folders[0]), str(folder)))):
            raise RunError(f"{folder} was run with another setup than {folders[0]} ({difference}): one calibration "
                           "holds for one setup")
        setup = this
        path = folder / "predictions.jsonl"
        if not path.is_file():
            raise RunError(f"{folder} holds no predictions.jsonl (not a spatialthinker-eval --out folder)")
        found, skipped = rows_with_probabilities(latest_records(read_predictions(path)))
        rows += found
        for reason, count in skipped.items():
            left_out[reason] = left_out.get(reason, 0) + count
    assert setup is not None
    return setup, rows, left_out


def calibrate(rows: Sequence[ScoredRow], coverage: float, setup: CalibrationSetup) -> Calibration:
    """The split conformal threshold of the rows' nonconformity scores 1 - p(true option)."""
    if not rows:
        raise CalibrationError("no scored row carries option probabilities: nothing to calibrate on")
    return Calibration.fit([nonconformity(r.probabilities, r.key) for r in rows], coverage, setup)


@dataclass(frozen=True)
class SetFigures:
    """How a calibration's prediction sets do on held-out rows."""

    rows: int
    coverage: float            # share of rows whose set holds the key
    mean_set_size: float
    singletons: float          # share of rows with exactly one option in the set
    empty: float               # share of rows with an empty set


def held_out_sets(calibration: Calibration, rows: Sequence[ScoredRow]) -> SetFigures:
    if not rows:
        raise CalibrationError("the test runs hold no scored row with option probabilities")
    sets = [calibration.prediction_set(r.probabilities, _letters(len(r.probabilities))) for r in rows]
    return SetFigures(rows=len(rows),
                      coverage=sum(option_letter(r.key) in s for r, s in zip(rows, sets)) / len(rows),
                      mean_set_size=sum(len(s) for s in sets) / len(rows),
                      singletons=sum(len(s) == 1 for s in sets) / len(rows),
                      empty=sum(not s for s in sets) / len(rows))
