"""Scoring: Wilson intervals, the exact McNemar test, summaries and the comparison of two runs."""

import math

import pytest

from spatialthinker_ros.evaluation.scoring import (compare, comparison_markdown, mcnemar_exact, summarize,
                                                         summary_markdown, wilson_interval)


def test_wilson_interval_known_values():
    low, high = wilson_interval(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and math.isclose(high, 1.959963984540054 ** 2 / (10 + 1.959963984540054 ** 2))
    low, high = wilson_interval(10, 10)
    assert math.isclose(high, 1.0) and math.isclose(low, 10 / (10 + 1.959963984540054 ** 2))
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("only_a,only_b,p", [
    (1, 9, 22 / 1024),          # 2 * (C(10,0) + C(10,1)) / 2^10
    (9, 1, 22 / 1024),
    (0, 5, 2 / 32),
    (3, 3, 1.0),
    (0, 0, 1.0),
    (2, 10, 2 * (1 + 12 + 66) / 4096),
])
def test_exact_mcnemar(only_a, only_b, p):
    assert math.isclose(mcnemar_exact(only_a, only_b), p)


def record(index, category, correct, choice="A", **extra):
    return {"index": index, "category": category, "correct": correct, "choice": choice, "status": "complete",
            "latency_s": 0.1 * (int(index) + 1), "completion_tokens": 10 * (int(index) + 1), "problems": [],
            **extra}


def test_summary_figures():
    records = {
        "0": record("0", "a", True), "1": record("1", "a", False, choice=""),
        "2": record("2", "b", True), "3": record("3", "b", True), "4": record("4", "b", False),
        "5": {"index": "5", "category": "", "skipped": "no image"},
        "6": record("6", "b", False, choice="", status="error", error="timeout", latency_s=9.0),
    }
    records["1"].update(status="no_answer", problems=["no <answer> section", "object cup.12 dropped: x 3"])
    summary = summarize(records, total=9, wall_seconds=2.0, answered_this_run=4)
    assert (summary["total"], summary["scored"], summary["skipped"], summary["pending"]) == (9, 6, 1, 2)
    assert summary["correct"] == 3 and summary["accuracy"] == 0.5
    assert summary["categories"]["a"] == {"total": 2, "correct": 1, "accuracy": 0.5,
                                          "ci95": list(wilson_interval(1, 2))}
    assert summary["categories"]["b"]["accuracy"] == 0.5
    assert summary["macro_accuracy"] == 0.5
    # the failed request (6) is counted and listed once, as failed, not also as an answer naming no option
    assert summary["unmatched"] == 1 and summary["unmatched_rows"] == ["1"]
    assert summary["unmatched_reasons"] == [{"index": "1", "reason": "no answer (status no_answer)"}]
    assert summary["failed_rows"] == [{"index": "6", "reason": "timeout"}]
    assert summary["errors"] == 1 and summary["status"] == {"complete": 4, "no_answer": 1, "error": 1}
    assert summary["parser_problems"] == {"no <answer> section": 1, "object # dropped: x #": 1}
    assert summary["latency_s"] == {"p50": pytest.approx(0.3), "p95": pytest.approx(0.5)}   # errors excluded
    assert summary["tokens_per_answer"] == pytest.approx((10 + 20 + 30 + 40 + 50) / 5)
    assert summary["throughput_rows_per_s"] == 2.0
    assert summary["skipped_rows"] == [{"index": "5", "reason": "no image"}]
    markdown = summary_markdown(summary)
    assert "| **overall** | 6 | 3 | 50.0 % |" in markdown and "| 5 | no image |" in markdown
    assert "| answer names no option (wrong) | 1 |" in markdown and "| request failed (wrong) | 1 |" in markdown
    assert "| 1 | no answer (status no_answer) |" in markdown and "| 6 | timeout |" in markdown


def test_summary_md_lists_the_first_50_unmatched_and_failed_rows_with_the_total():
    records = {str(i): record(str(i), "a", False, choice="", parsed_answer=f"banana {i}") for i in range(60)}
    records |= {str(i): record(str(i), "a", False, choice="", status="error", error=f"no reply {i}")
                for i in range(60, 63)}
    markdown = summary_markdown(summarize(records, total=63))
    assert "| unmatched row (60) | reason |" in markdown and "| failed row (3) | reason |" in markdown
    assert "| 49 | the answer 'banana 49' names no option |" in markdown
    assert "| 50 |" not in markdown and "| ... | 10 more in summary.json |" in markdown
    assert all(f"| {i} | no reply {i} |" in markdown for i in range(60, 63))


def test_compare_two_known_prediction_sets():
    # 12 shared rows: both right on 4, only A on 1, only B on 6, both wrong on 1; B has one row A lacks
    a, b = {}, {}
    outcomes = [(1, 1)] * 4 + [(1, 0)] + [(0, 1)] * 6 + [(0, 0)]
    for i, (right_a, right_b) in enumerate(outcomes):
        category = "x" if i < 6 else "y"
        a[str(i)] = record(str(i), category, bool(right_a))
        b[str(i)] = record(str(i), category, bool(right_b))
    b["12"] = record("12", "y", True)
    a["13"] = {"index": "13", "category": "", "skipped": "no image"}
    overall, x, y = compare(a, b)
    assert (overall.name, overall.both, overall.correct_a, overall.correct_b) == ("all rows", 12, 5, 10)
    assert (overall.only_a, overall.only_b) == (1, 6)
    assert overall.rows_a == 12 and overall.rows_b == 13 and overall.accuracy_b == 11 / 13
    assert overall.difference == pytest.approx(5 / 12)
    assert overall.p_value == pytest.approx(2 * (1 + 7) / 128)
    assert (x.name, x.both, x.only_a, x.only_b) == ("x", 6, 1, 1) and x.p_value == 1.0
    assert (y.name, y.both, y.only_b, y.rows_b) == ("y", 6, 5, 7)
    table = comparison_markdown([overall, x, y], "A", "B")
    assert "| all rows | 12 | 41.7 % | 13 | 84.6 % | 12 | +41.7 pt | 1 | 6 | 0.125 |" in table
