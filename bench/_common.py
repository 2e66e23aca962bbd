"""Shared by the bench scripts: statistics, result files, tables. ROS-free (the GPU script imports it on machines
without ROS). Isolation and child processes come from spatialthinker_ros.testing, as in the tests and the demo.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Optional, Sequence

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
    """bench/results/<name>.json (git-ignored) unless a path is given; returns where it went."""
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
