"""What spatialthinker_mcp adds to a question: an MCP ask_spatial call against the direct ~/ask service call (and
the ~/ask_action goal), same node, same run, replay backend (no model time).

    .venv/bin/python -m bench.mcp_overhead
    .venv/bin/python -m bench.mcp_overhead --requests 200

The node answers the bundled sample scene, streamed with depth by spatialthinker_camera; this process calls, in turn
and interleaved (so machine noise hits all alike):

    service        AskSpatial on ~/ask from rclpy: the floor every ROS client pays
    action         the same question as a ~/ask_action goal (goal, feedback, result)
    mcp            ask_spatial through the official MCP client over stdio to a spatialthinker_mcp child, no
                   progress token: JSON-RPC, the server's ~/ask call, shaping the structured result (objects,
                   relations, decision) and its schema validation
    mcp_progress   the same with a progress token: the server sends an ~/ask_action goal and relays its feedback

mcp minus service is the overhead an agent pays for MCP over calling the node directly; the goal is under 10 ms.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import anyio

from spatialthinker_ros.testing.isolation import isolate_ros
from spatialthinker_ros.testing.processes import Processes, installed_executable, node_command

from bench._common import machine, summary_ms, table, write_results

SCRATCH = isolate_ros(prefix="spatialthinker-bench-")

from bench._rosbench import Asker, rclpy  # noqa: E402

from spatialthinker_ros.srv import AskSpatial  # noqa: E402
from spatialthinker_ros.testing.mcp_client import mcp_client  # noqa: E402

KINDS = ("service", "action", "mcp", "mcp_progress")


def sample_scene():
    import spatialthinker_ros

    data = Path(spatialthinker_ros.__file__).parent / "data"
    meta = json.loads((data / "sample_scene.json").read_text())
    return data, meta


def camera_command(data, meta) -> list[str]:
    c = meta["camera"]
    return [str(installed_executable("spatialthinker_camera")), "--image", str(data / meta["image"]),
            "--depth", str(data / meta["depth"]), "--fx", str(c["fx"]), "--fy", str(c["fy"]), "--cx", str(c["cx"]),
            "--cy", str(c["cy"]), "--rate", "10"]


async def measure(args, asker: Asker, question: dict) -> dict:
    request = AskSpatial.Request(question=question["question"], options=question["options"])
    arguments = {"question": question["question"], "options": question["options"]}
    times = {kind: [] for kind in KINDS}
    failures = []

    def by_service() -> float:
        response, seconds = asker.timed_call(request)
        if not response.success:
            failures.append(f"service: {response.message}")
        return seconds

    def by_action() -> float:
        started = time.perf_counter()
        result = asker.ask_action(30.0, question=question["question"], options=question["options"])
        if not result.success:
            failures.append(f"action: {result.message}")
        return time.perf_counter() - started

    async def progress(value, total, message) -> None:   # asking for progress is what sends the goal
        pass

    async with mcp_client(SCRATCH / "mcp.log") as client:
        for i in range(args.warmup + args.requests):
            for kind in KINDS:
                if kind.startswith("mcp"):
                    started = time.perf_counter()
                    result = await client.call_tool("ask_spatial", arguments, 30.0,
                                                    progress if kind == "mcp_progress" else None)
                    seconds = time.perf_counter() - started
                    if result.is_error:
                        failures.append(f"mcp: {result.content[0].text}")
                else:
                    seconds = await anyio.to_thread.run_sync(by_service if kind == "service" else by_action)
                if i >= args.warmup:
                    times[kind].append(seconds)
    results = {kind: summary_ms(values) for kind, values in times.items()}
    results["overhead_over_service_p50_ms"] = results["mcp"]["p50_ms"] - results["service"]["p50_ms"]
    results["progress_overhead_over_action_p50_ms"] = results["mcp_progress"]["p50_ms"] - results["action"]["p50_ms"]
    results["failure_count"], results["failures"] = len(failures), failures[:5]
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100, help="measured requests per kind")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", help="result file (default bench/results/mcp_overhead.json)")
    args = parser.parse_args(argv)
    data, meta = sample_scene()
    question = meta["questions"][0]
    rclpy.init()
    asker = Asker()
    try:
        with Processes(SCRATCH) as kids:
            node = kids.start(node_command(backend="replay", replay_file=str(data / meta["replay_file"])), "node")
            kids.start(camera_command(data, meta), "camera")
            asker.wait_ready(node, timeout=60.0, question=question["question"], options=question["options"])
            asker.wait_for_action(node)
            print(f"[mcp_overhead] {args.requests} requests of each kind ...", file=sys.stderr, flush=True)
            results = anyio.run(measure, args, asker, question)
    finally:
        asker.close()
        rclpy.try_shutdown()
        shutil.rmtree(SCRATCH, ignore_errors=True)

    print(f"\nMCP overhead, {machine()}, {args.requests} sequential requests per kind, replay backend, 640x480 "
          "sample scene with depth")
    print(table([[kind, f"{results[kind]['p50_ms']:.2f}", f"{results[kind]['p95_ms']:.2f}"] for kind in KINDS],
                ["kind", "p50 ms", "p95 ms"]))
    print(f"\nmcp - service (p50): {results['overhead_over_service_p50_ms']:.2f} ms; mcp_progress - action (p50): "
          f"{results['progress_overhead_over_action_p50_ms']:.2f} ms; failed: {results['failure_count']}")
    path = write_results("mcp_overhead", {"args": vars(args), **results}, args.json)
    print(f"\nresults: {path}")
    return 1 if results["failure_count"] else 0


if __name__ == "__main__":
    sys.exit(main())
