"""Accuracy with honest uncertainty, from prediction records, and paired comparison of two runs.

A prediction record is one line of predictions.jsonl (see evaluation.runner). A row counts as scored when
it was asked and the deployment answered or failed ("error"); it is correct only when the letter the
product's parser read equals the answer key. An unmatched answer, no answer and a failed request are wrong.
Skipped rows (they could not be asked) count in `skipped`, never in the accuracy.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from spatialthinker_ros.core.text import excerpt

Z95 = 1.959963984540054   # two-sided 95 % normal quantile
LISTED_ROWS = 50          # unmatched, failed and skipped rows summary.md lists by index (summary.json: all)


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion: unlike the normal one it stays inside [0, 1] and is
    sensible for small counts and accuracies near 0 or 1. (0, 1) when total is 0."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test (p = 1/2) on the discordant pairs, where `only_a`
    rows are right only in run A and `only_b` only in run B. 1.0 when there are none."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def latest_records(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """index -> the last record written for it (a resumed run may re-ask failed or skipped rows)."""
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        latest[str(record["index"])] = record
    return latest


def is_scored(record: dict[str, Any]) -> bool:
    return "skipped" not in record


def summarize(records: dict[str, dict[str, Any]], total: int, wall_seconds: Optional[float] = None,
              answered_this_run: int = 0, meta: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """summary.json: accuracy overall, per category and macro-averaged, each with a Wilson interval;
    answer status counts, unmatched answers, parser problems, latency, tokens and throughput.

    `total` is how many rows the data selection holds (rows not yet asked count as pending).
    """
    scored = [r for r in records.values() if is_scored(r)]
    skipped = [r for r in records.values() if not is_scored(r)]
    correct = sum(1 for r in scored if r.get("correct"))
    per_category: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in scored:
        per_category[str(record.get("category", "all"))].append(record)
    categories = {name: _accuracy(sum(1 for r in rows if r.get("correct")), len(rows))
                  for name, rows in sorted(per_category.items())}
    macro = sum(c["accuracy"] for c in categories.values()) / len(categories) if categories else 0.0
    latencies = sorted(r["latency_s"] for r in scored if r.get("latency_s") is not None and not r.get("error"))
    tokens = [r["completion_tokens"] for r in scored if r.get("completion_tokens") and not r.get("error")]
    problems = Counter(_problem_kind(p) for r in scored for p in r.get("problems", []))
    failed = [r for r in scored if r.get("error")]
    unmatched = [r for r in scored if not r.get("choice") and not r.get("error")]   # a failure is counted once
    summary: dict[str, Any] = dict(meta or {})
    summary.update({
        "total": total,
        "scored": len(scored),
        "skipped": len(skipped),
        "pending": max(0, total - len(scored) - len(skipped)),
        "correct": correct,
        "accuracy": correct / len(scored) if scored else 0.0,
        "ci95": list(wilson_interval(correct, len(scored))),
        "macro_accuracy": macro,
        # An approximation: exact when the categories are of equal size.
        "macro_ci95": list(wilson_interval(round(macro * len(scored)), len(scored))),
        "unmatched": len(unmatched),
        "categories": categories,
        "status": dict(Counter(r.get("status", "error") for r in scored)),
        "errors": sum(1 for r in scored if r.get("error")),
        "parser_problems": dict(problems.most_common()),
        "latency_s": {"p50": _percentile(latencies, 50), "p95": _percentile(latencies, 95)},
        "tokens_per_answer": sum(tokens) / len(tokens) if tokens else None,
        "throughput_rows_per_s": (answered_this_run / wall_seconds) if wall_seconds and answered_this_run else None,
        "unmatched_rows": [r["index"] for r in unmatched],
        "unmatched_reasons": [{"index": r["index"], "reason": _unmatched_reason(r)} for r in unmatched],
        "failed_rows": [{"index": r["index"], "reason": r["error"]} for r in failed],
        "skipped_rows": [{"index": r["index"], "reason": r["skipped"]} for r in skipped],
    })
    return summary


def _unmatched_reason(record: dict[str, Any]) -> str:
    answer = record.get("parsed_answer")
    if answer:
        return f"the answer {excerpt(answer)!r} names no option"
    return f"no answer (status {record.get('status', '?')})"


def _accuracy(correct: int, total: int) -> dict[str, Any]:
    return {"total": total, "correct": correct, "accuracy": correct / total if total else 0.0,
            "ci95": list(wilson_interval(correct, total))}


def _percentile(values: Sequence[float], q: float) -> Optional[float]:
    """Nearest-rank percentile of sorted values (None for none)."""
    if not values:
        return None
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]


_DETAIL_RE = re.compile(r"'[^']*'|\"[^\"]*\"|\b[A-Za-z_]+\.\d+\b|\d+(\.\d+)?")


def _problem_kind(message: str) -> str:
    """A parser message with its particulars (ids, numbers, quoted text) blanked, so like problems count together."""
    return _DETAIL_RE.sub("#", message)


def summary_markdown(summary: dict[str, Any]) -> str:
    """summary.md: the summary's figures as tables."""
    backend, model = summary.get("backend", "?"), summary.get("model")
    title = (f"node {summary.get('node')}" if backend == "node" else
             backend if model in (None, backend) else f"{model} ({backend} backend)")
    lines = [f"# Evaluation of {title}", ""]
    if summary.get("data"):
        lines += [f"Data: {', '.join(summary['data'])} ({summary.get('format', '?')})", ""]
    lines += ["| | rows | correct | accuracy | 95 % interval |", "|---|---:|---:|---:|---|"]
    lines.append(_row("**overall**", {**summary, "total": summary["scored"]}))
    lines.append(f"| **macro average** ({len(summary['categories'])} categories) | | | "
                 f"{_pct(summary['macro_accuracy'])} | {_interval(summary['macro_ci95'])} |")
    lines += [_row(name, figures) for name, figures in summary["categories"].items()]
    latency, tokens, rate = summary["latency_s"], summary["tokens_per_answer"], summary["throughput_rows_per_s"]
    lines += [
        "", "| rows | |", "|---|---:|",
        f"| selected | {summary['total']} |", f"| scored | {summary['scored']} |",
        f"| skipped (could not be asked) | {summary['skipped']} |", f"| pending (not asked yet) | {summary['pending']} |",
        f"| answer names no option (wrong) | {summary['unmatched']} |", f"| request failed (wrong) | {summary['errors']} |",
        "", "| answer status | rows |", "|---|---:|",
        *[f"| {status} | {count} |" for status, count in sorted(summary["status"].items())],
        "", "| cost | |", "|---|---:|",
        f"| latency p50 | {_seconds(latency['p50'])} |", f"| latency p95 | {_seconds(latency['p95'])} |",
        f"| tokens per answer | {'-' if tokens is None else f'{tokens:.1f}'} |",
        f"| throughput (this run) | {'-' if rate is None else f'{rate:.3g} rows/s'} |",
    ]
    if summary["parser_problems"]:
        lines += ["", "| parser problem | times |", "|---|---:|",
                  *[f"| {kind.replace('|', '/')} | {count} |" for kind, count in summary["parser_problems"].items()]]
    for what, rows in (("unmatched row", summary["unmatched_reasons"]), ("failed row", summary["failed_rows"]),
                       ("skipped row", summary["skipped_rows"])):
        lines += _listed_rows(what, rows)
    return "\n".join(lines) + "\n"


def _listed_rows(what: str, rows: Sequence[dict[str, Any]]) -> list[str]:
    """A table of the first LISTED_ROWS rows and their reasons, saying how many more summary.json holds."""
    if not rows:
        return []
    lines = ["", f"| {what} ({len(rows)}) | reason |", "|---|---|",
             *[f"| {r['index']} | {excerpt(r['reason'], 200).replace('|', '/')} |" for r in rows[:LISTED_ROWS]]]
    if len(rows) > LISTED_ROWS:
        lines.append(f"| ... | {len(rows) - LISTED_ROWS} more in summary.json |")
    return lines


def _row(name: str, figures: dict[str, Any]) -> str:
    return (f"| {name} | {figures['total']} | {figures['correct']} | {_pct(figures['accuracy'])} | "
            f"{_interval(figures['ci95'])} |")


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def _interval(bounds: Sequence[float]) -> str:
    return f"{100 * bounds[0]:.1f} - {100 * bounds[1]:.1f} %"


def _seconds(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f} s"


# ---- comparing two runs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedFigures:
    """One category (or all) of two runs: each run's own accuracy, and on the rows both answered how many
    each got right, how many only A and only B got right, and the exact McNemar p-value."""

    name: str
    rows_a: int
    accuracy_a: float
    rows_b: int
    accuracy_b: float
    both: int
    correct_a: int
    correct_b: int
    only_a: int
    only_b: int

    @property
    def difference(self) -> float:
        """Accuracy of B minus A on the rows both answered."""
        return (self.correct_b - self.correct_a) / self.both if self.both else 0.0

    @property
    def p_value(self) -> float:
        return mcnemar_exact(self.only_a, self.only_b)


def compare(records_a: dict[str, dict[str, Any]], records_b: dict[str, dict[str, Any]]) -> list[PairedFigures]:
    """Overall (first, named "all rows") and per category, over each run's scored rows."""
    scored_a = {i: r for i, r in records_a.items() if is_scored(r)}
    scored_b = {i: r for i, r in records_b.items() if is_scored(r)}
    names = sorted({str(r.get("category", "all")) for r in (*scored_a.values(), *scored_b.values())})
    figures = [_paired("all rows", scored_a, scored_b)]
    for name in names:
        figures.append(_paired(name, {i: r for i, r in scored_a.items() if str(r.get("category", "all")) == name},
                               {i: r for i, r in scored_b.items() if str(r.get("category", "all")) == name}))
    return figures


def _paired(name: str, a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> PairedFigures:
    both = sorted(set(a) & set(b))
    right_a = {i for i in both if a[i].get("correct")}
    right_b = {i for i in both if b[i].get("correct")}
    return PairedFigures(
        name=name,
        rows_a=len(a), accuracy_a=sum(1 for r in a.values() if r.get("correct")) / len(a) if a else 0.0,
        rows_b=len(b), accuracy_b=sum(1 for r in b.values() if r.get("correct")) / len(b) if b else 0.0,
        both=len(both), correct_a=len(right_a), correct_b=len(right_b),
        only_a=len(right_a - right_b), only_b=len(right_b - right_a),
    )


def comparison_markdown(figures: Sequence[PairedFigures], label_a: str, label_b: str) -> str:
    """The comparison as a table: per category each run's accuracy, then B - A on shared rows and p."""
    lines = [f"A: {label_a}", f"B: {label_b}", "",
             "| category | rows A | acc. A | rows B | acc. B | both answered | B - A (both) | only A right | "
             "only B right | McNemar p |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for f in figures:
        lines.append(f"| {f.name} | {f.rows_a} | {_pct(f.accuracy_a)} | {f.rows_b} | {_pct(f.accuracy_b)} | "
                     f"{f.both} | {100 * f.difference:+.1f} pt | {f.only_a} | {f.only_b} | {f.p_value:.4g} |")
    return "\n".join(lines) + "\n"
