"""How far a run's option probabilities can be trusted, and split conformal calibration from runs.

Works on predictions.jsonl records (evaluation.runner) that carry `option_probabilities`: floats in option
order, summing to 1; absent or empty when the backend gave none. Only scored rows count. A row's confidence is
the probability of the option its answer chose; an answer that names no option has no confidence: the summary
counts it apart (calibration still uses it: its nonconformity needs only the key's probability).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from spatialthinker_ros.core.conformal import (Calibration, CalibrationError, CalibrationSetup, nonconformity,
                                               setup_differences)
from spatialthinker_ros.core.prompt import option_letter
from spatialthinker_ros.evaluation.runner import read_predictions
from spatialthinker_ros.evaluation.scoring import is_scored, latest_records

ECE_BINS = 15
SELECTIVE_SHARES = (0.5, 0.8)   # shares of the rows answered, most confident first
RELIABILITY_PNG = "reliability.png"
ACCURACY_SHARE_PNG = "accuracy_share_answered.png"   # "coverage" is kept for prediction sets


@dataclass(frozen=True)
class ScoredRow:
    """One scored row with probabilities: the probabilities, the key's and the chosen option's index."""

    index: str
    probabilities: tuple[float, ...]
    key: int
    choice: Optional[int]          # None: the answer names no option
    correct: bool
    identity: str = ""             # row_identity, across runs (runs_rows)

    @property
    def confidence(self) -> float:
        return 0.0 if self.choice is None else self.probabilities[self.choice]


def _letters(n: int) -> list[str]:
    return [option_letter(i) for i in range(n)]


def rows_with_probabilities(records: dict[str, dict[str, Any]]) -> tuple[list[ScoredRow], dict[str, int]]:
    """The scored rows that carry usable probabilities, and counts of the scored rows left out, by reason."""
    rows, left_out = [], {"answered after the out-of-memory retry": 0, "no probabilities": 0,
                          "probabilities do not match the options": 0}
    for record in records.values():
        if not is_scored(record):
            continue
        if record.get("retried"):   # at a smaller image size, which no calibration holds for
            left_out["answered after the out-of-memory retry"] += 1
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


def brier_over_options(rows: Sequence[ScoredRow]) -> float:
    """The multi-class Brier score: mean over rows of the sum over options of (p_j - [j is the key])^2; 0 is
    perfect, 2 the worst (rows with 2 and 4 options mixed alike)."""
    return sum(sum((p - (j == row.key)) ** 2 for j, p in enumerate(row.probabilities)) for row in rows) / len(rows)


def brier_of_choice(rows: Sequence[ScoredRow]) -> float:
    """The binary Brier score of the chosen option: mean of (confidence - [the answer is right])^2, 0 to 1."""
    return sum((row.confidence - row.correct) ** 2 for row in rows) / len(rows)


def _average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks of `values`, ties sharing the average of their ranks."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="stable")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return ranks


def auroc(rows: Sequence[ScoredRow]) -> Optional[float]:
    """The probability that a random right row has a higher confidence than a random wrong one, ties counting
    half (Mann-Whitney U from average ranks). None when every row is right, or every row wrong."""
    right = np.array([r.correct for r in rows], dtype=bool)
    n_right, n_wrong = int(right.sum()), int((~right).sum())
    if not n_right or not n_wrong:
        return None
    ranks = _average_ranks([r.confidence for r in rows])
    return float((ranks[right].sum() - n_right * (n_right + 1) / 2) / (n_right * n_wrong))


def accuracy_by_share_answered(rows: Sequence[ScoredRow]) -> list[float]:
    """Accuracy of the m most confident rows, for m = 1..n. Rows tied in confidence at the cut count by their
    group's accuracy (the expectation over the orders of the tie), not by the order the rows came in."""
    confidence = np.array([r.confidence for r in rows])
    correct = np.array([r.correct for r in rows], dtype=float)
    levels, group = np.unique(-confidence, return_inverse=True)      # most confident group first
    sizes = np.bincount(group, minlength=len(levels))
    rights = np.bincount(group, weights=correct, minlength=len(levels))
    before = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    right_before = np.concatenate([[0.0], np.cumsum(rights)[:-1]])
    m = np.arange(1, len(rows) + 1)
    g = np.searchsorted(np.cumsum(sizes), m)                             # the group the m-th row falls in
    return list((right_before[g] + (m - before[g]) * rights[g] / sizes[g]) / m)


def selective_accuracy(rows: Sequence[ScoredRow], share: float) -> float:
    """Accuracy of the most confident ceil(share * n) rows (ties averaged)."""
    return accuracy_by_share_answered(rows)[max(1, math.ceil(share * len(rows))) - 1]


def calibration_summary(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """summary.json's "calibration": the metrics over scored rows with probabilities whose answer names an option
    (a row naming none has no confidence: it is counted apart, not scored as confidence 0); None with a reason
    when there are none."""
    rows, left_out = rows_with_probabilities(records)
    chosen = [row for row in rows if row.choice is not None]
    summary: dict[str, Any] = {"rows": len(chosen), "rows_without_choice": len(rows) - len(chosen),
                               "rows_left_out": left_out, "ece_bins": ECE_BINS}
    if not chosen:
        reason = ("no scored row carries option probabilities (the backend gave none, or no row was scored)"
                  if not rows and not left_out.keys() - {"no probabilities"} else
                  "no scored row carries option probabilities that match its options" if not rows else
                  "no answer with option probabilities names an option")
        return summary | {"reason": reason, "ece": None, "brier_over_options": None, "brier_of_choice": None,
                          "auroc": None, "selective_accuracy": None, "bins": None}
    return summary | {
        "reason": None,
        "ece": expected_calibration_error(chosen),
        "brier_over_options": brier_over_options(chosen),
        "brier_of_choice": brier_of_choice(chosen),
        "auroc": auroc(chosen),
        "selective_accuracy": {f"{share:g}": selective_accuracy(chosen, share) for share in SELECTIVE_SHARES},
        "bins": reliability_bins(chosen),
    }


def calibration_markdown(calibration: dict[str, Any]) -> list[str]:
    """summary.md lines of calibration_summary's figures."""
    left = ", ".join(f"{count} {reason}" for reason, count in calibration["rows_left_out"].items())
    left = f"; left out: {left}" if left else ""
    apart = calibration["rows_without_choice"]
    apart = f"; {apart} more name no option (no confidence: not in these figures)" if apart else ""
    head = ["", f"## Option probabilities ({calibration['rows']} scored rows{apart}{left})", ""]
    if calibration["reason"]:
        return head + [f"No calibration figures: {calibration['reason']}."]
    auc, selective = calibration["auroc"], calibration["selective_accuracy"]
    return head + [
        "| figure | value |", "|---|---:|",
        f"| expected calibration error ({calibration['ece_bins']} bins) | {calibration['ece']:.4f} |",
        f"| Brier score over the options (sum over options of (p - right)^2; 0 best, 2 worst) | "
        f"{calibration['brier_over_options']:.4f} |",
        f"| Brier score of the chosen option ((p - right)^2; 0 best, 1 worst) | {calibration['brier_of_choice']:.4f} |",
        f"| AUROC of the chosen option's probability for right answers | {'-' if auc is None else f'{auc:.4f}'} |",
        *[f"| accuracy with the most confident {100 * float(f):g} % answered (share answered) | {100 * a:.1f} % |"
          for f, a in selective.items()],
        "", f"Pictures: {RELIABILITY_PNG}, {ACCURACY_SHARE_PNG}.",
    ]


def write_pictures(rows: Sequence[ScoredRow], folder: Path) -> list[Path]:
    """The reliability diagram and the accuracy-by-share-answered curve of the rows that name an option, as PNGs
    (matplotlib's Agg canvas, no display and no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [row for row in rows if row.choice is not None]
    bins = [b for b in reliability_bins(rows) if b["rows"]]
    reliability = Figure(figsize=(5, 5.6), dpi=100)
    FigureCanvasAgg(reliability)
    ax = reliability.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.bar([b["lower"] for b in bins], [b["accuracy"] for b in bins], width=1 / ECE_BINS, align="edge",
           edgecolor="black", alpha=0.7, label="accuracy per bin (n = its rows)")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="black",
            label="(mean confidence, accuracy)")
    for b in bins:   # a bin of 1 row looks as solid as one of 100: say how many
        ax.annotate(f"{b['rows']}", (b["lower"] + 0.5 / ECE_BINS, b["accuracy"]), xytext=(0, 2),
                    textcoords="offset points", ha="center", va="bottom", fontsize="x-small")
    ax.set(xlim=(0, 1), ylim=(0, 1.08), xlabel="confidence (probability of the chosen option)", ylabel="accuracy",
           title=f"Reliability, {len(rows)} rows, ECE {expected_calibration_error(rows):.3f}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize="x-small", frameon=False)
    reliability.subplots_adjust(bottom=0.2)

    curve = accuracy_by_share_answered(rows)
    selective = Figure(figsize=(5, 4), dpi=100)
    FigureCanvasAgg(selective)
    ax = selective.add_subplot()
    ax.plot([m / len(rows) for m in range(1, len(rows) + 1)], curve, drawstyle="steps-post")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="share answered (most confident first)",
           ylabel="accuracy of the rows answered", title=f"Accuracy by share answered, {len(rows)} rows")
    ax.grid(alpha=0.3)
    paths = [folder / RELIABILITY_PNG, folder / ACCURACY_SHARE_PNG]
    for figure, path in zip((reliability, selective), paths):
        figure.savefig(path, format="png")
    return paths


# ---- conformal calibration from runs ----------------------------------------------------------------------


class RunError(ValueError):
    """A run folder that cannot be calibrated from (missing files, no setup, setups that differ)."""


def run_setup(folder: Path) -> CalibrationSetup:
    """What answered a spatialthinker-eval run (run.json's calibration_setup; a --node run's read from the node)."""
    path = folder / "run.json"
    try:
        recorded = json.loads(path.read_text())
    except OSError:
        raise RunError(f"{folder} holds no run.json (not a spatialthinker-eval --out folder)") from None
    except ValueError as exc:
        raise RunError(f"{path} is not JSON ({exc})") from None
    if "calibration_setup" not in recorded:
        raise RunError(f"{path} records no calibration setup (a run of an earlier version, or one that answered no "
                       "row): rerun it with this version into another --out")
    setup = recorded["calibration_setup"]
    if setup is None:
        raise RunError(f"{folder}: the run could not record what answered it "
                       f"({recorded.get('calibration_setup_problem') or 'unknown'}), which a calibration must hold for")
    try:
        return CalibrationSetup(**setup)
    except TypeError as exc:
        raise RunError(f"{path}'s calibration_setup is not one this version reads ({exc})") from None


def runs_rows(folders: Sequence[Path]) -> tuple[CalibrationSetup, list[ScoredRow], dict[str, int]]:
    """The one setup of the runs (RunError when they differ), their scored rows with probabilities, each row once
    (by row_identity: the same question of the same data file counted twice would pass for more evidence than it
    is), and the scored rows left out, by reason."""
    setup: Optional[CalibrationSetup] = None
    rows: list[ScoredRow] = []
    seen: set[str] = set()
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
        records = latest_records(read_predictions(path))
        found, skipped = rows_with_probabilities(records)
        data = json.loads((folder / "run.json").read_text()).get("data") or []
        for row in found:
            identity = row_identity(data, records[row.index])
            if identity in seen:
                skipped["counted already (the same row in another run)"] = \
                    skipped.get("counted already (the same row in another run)", 0) + 1
                continue
            seen.add(identity)
            rows.append(replace(row, identity=identity))
        for reason, count in skipped.items():
            left_out[reason] = left_out.get(reason, 0) + count
    assert setup is not None
    return setup, rows, left_out


def row_identity(data: Sequence[str], record: dict[str, Any]) -> str:
    """Which question a row is, across runs: the data files' names, the row's index and its question."""
    return json.dumps([sorted(Path(d).name for d in data), str(record["index"]), record.get("question", "")])


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
