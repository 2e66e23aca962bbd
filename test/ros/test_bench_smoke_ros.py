"""The ROS benchmark scripts run end to end on a short setting and report sane figures (bench/; no speed is
asserted). Each script isolates its own ROS graph and stops what it started."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]   # bench/ is a package of the checkout: python -m bench.<script>


def run_bench(script: str, *args: str, timeout: float) -> Any:
    out = Path(args[args.index("--json") + 1])
    result = subprocess.run([sys.executable, "-m", f"bench.{script}", *args], capture_output=True, text=True,
                            timeout=timeout, env=os.environ.copy(), cwd=ROOT)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.mark.timeout(150)
def test_idle_cpu_measures_the_node_the_bare_subscriber_and_the_eager_reference(tmp_path: Path):
    report = run_bench("idle_cpu", "--modes", "compressed_nodepth", "--width", "640", "--height", "480",
                       "--seconds", "2", "--windows", "2", "--warmup", "0.5", "--references", "eager",
                       "--json", str(tmp_path / "idle.json"), timeout=140)
    (mode,) = report["modes"]
    assert mode["node_answered_after"] is True
    assert mode["node_colour_hz"] > 5 and mode["bare_colour_hz"] > 5          # both received the stream
    assert 0 < mode["node_core_fraction"] < 2 and 0 < mode["bare_core_fraction"] < 2
    eager = mode["references"]["eager"]
    assert 0 < eager["core_fraction"] < 2 and math.isfinite(eager["ratio_to_bare_median"])


@pytest.mark.timeout(150)
def test_request_overhead_measures_the_node_against_the_bare_round_trips(tmp_path: Path):
    report = run_bench("request_overhead", "--sizes", "640x480", "--requests", "5", "--warmup", "1",
                       "--breakdown-repeats", "2", "--json", str(tmp_path / "overhead.json"), timeout=140)
    size = report["sizes"]["640x480"]
    assert size["failure_count"] == 0
    for kind in ("node_camera", "node_image", "floor_image", "floor_noimage", "echo"):
        assert size[kind]["n"] == 5 and 0 < size[kind]["p50_ms"] <= size[kind]["p95_ms"] < 10_000, kind
    assert all(math.isfinite(ms) and ms >= 0 for ms in size["breakdown_ms"].values())


@pytest.mark.timeout(150)
def test_reply_loss_counts_what_callers_lost_and_what_each_node_counted_on_its_stats(tmp_path: Path):
    [report] = run_bench("reply_loss", "--mode", "restart", "--runs", "2", "--busy", "0",   # runs are appended
                         "--json", str(tmp_path / "reply_loss.json"), timeout=140)
    assert report["mode"] == "restart" and report["asked"] == 2 and report["not_found"] == 0
    assert set(report["lost"]) == {"service", "goal", "result"}
    counted = report["node_replies"]   # from each node's ~/stats, summed
    assert set(counted) == {"dropped", "resent", "abandoned"}
    assert 0 <= counted["resent"] + counted["abandoned"] <= counted["dropped"]


@pytest.mark.timeout(150)
def test_mcp_overhead_measures_the_mcp_calls_against_the_service_and_the_action(tmp_path: Path):
    report = run_bench("mcp_overhead", "--requests", "3", "--warmup", "1", "--json", str(tmp_path / "mcp.json"),
                       timeout=140)
    assert report["failure_count"] == 0
    for kind in ("service", "action", "mcp", "mcp_progress"):
        assert report[kind]["n"] == 3 and 0 < report[kind]["p50_ms"] <= report[kind]["p95_ms"] < 10_000, kind
    assert report["overhead_over_service_p50_ms"] == report["mcp"]["p50_ms"] - report["service"]["p50_ms"]
    assert (report["progress_overhead_over_action_p50_ms"]
            == report["mcp_progress"]["p50_ms"] - report["action"]["p50_ms"])
