"""Shared by the bench scripts: statistics, result files, tables. ROS-free (the GPU script imports it on machines
without ROS). Isolation and child processes come from spatialthinker_ros.testing, as in the tests and the demo.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import timeit
from pathlib import Path
from typing import Callable, Optional, Sequence

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary_ms(seconds: Sequence[float]) -> dict:
    ms = [s * 1000.0 for s in seconds]
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
            "mean_ms": statistics.fmean(ms) if ms else float("nan"), "min_ms": min(ms) if ms else float("nan")}


def machine() -> str:
    cores = os.cpu_count()
    gpu = ""
    try:
        import torch  # noqa: PLC0415  (only when already installed; never required)

        if torch.cuda.is_available():
            gpu = f", {torch.cuda.get_device_name(0)}"
    except Exception:
        pass
    return f"{cores}-core {platform.machine()} {platform.system()}{gpu}"


def write_results(name: str, results: dict, path: Optional[str] = None) -> Path:
    """bench/results/<name>.json unless a path is given; returns where it went."""
    results = {"benchmark": name, "date": datetime.date.today().isoformat(), "machine": machine(),
               "python": sys.version.split()[0], **results}
    target = Path(path) if path else RESULTS_DIR / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return target


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def timing_parser(description: str, name: str) -> argparse.ArgumentParser:
    """The options of the scripts that time a CPU cost with per_call_us: --repeat, --min-time, --quick (a short run
    for the smoke tests: quick_timing applies it) and --json (default bench/results/NAME.json)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per timed loop")
    parser.add_argument("--quick", action="store_true", help="a short run: --repeat 1 --min-time 0.01 (and less data)")
    parser.add_argument("--json", help=f"result file (default bench/results/{name}.json)")
    return parser


def quick_timing(args: argparse.Namespace) -> bool:
    """Applies --quick to the timing options; returns whether it was given (a script shrinks its data too)."""
    if args.quick:
        args.repeat, args.min_time = 1, 0.01
    return args.quick


def per_call_us(fn: Callable[[], object], repeat: int, min_time: float) -> float:
    """Microseconds per call of fn: the best of `repeat` loops, each sized to take about `min_time` seconds."""
    timer = timeit.Timer(fn)
    number = 1
    while timer.timeit(number) < min_time:
        number *= 4
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e6
