"""Idle CPU of spatialthinker_node while a camera streams and nobody asks, against a bare rclpy subscriber.

    .venv/bin/python -m bench.idle_cpu                 # raw 1080p30 rgb8 + 16UC1 depth + CameraInfo, then JPEG colour
    .venv/bin/python -m bench.idle_cpu --modes raw --seconds 30

Per mode, three processes run at once on one isolated ROS graph: a camera publisher, the node (replay backend:
no model to load) and a bare rclpy subscriber with the node's subscriptions and QoS (keep last 1, best effort),
which keeps a reference to each message. Both subscribers receive the same stream at the same time, so the
machine's noise hits both alike; CPU is each process's own user+system time (psutil) over consecutive windows,
as a fraction of one core. The ratio node / bare is computed per window and its median reported.

A second pass per mode adds two more subscribers, for the designs the node chose against (the "before" of its
fast path): `eager` converts every frame on arrival with the product's conversions (JPEG decode, depth to metres),
and `multithreaded` is the bare subscriber on a MultiThreadedExecutor. Their ratios are to the node and the bare
subscriber of that pass; the node's own figures come from the first pass, which they cannot crowd (2 cores here).
`--references ''` skips the second pass.
"""

from __future__ import annotations

import argparse
import shutil
import os
import statistics
import sys
import time

import psutil

from spatialthinker_ros.testing.isolation import DDS_TRANSPORTS, isolate_ros, use_dds_transport
from spatialthinker_ros.testing.processes import Processes

from bench._common import machine, table, write_results

SCRATCH = isolate_ros(prefix="spatialthinker-bench-")

from bench._rosbench import (OPTIONS, QUESTION, Asker, poke_status, probed_node_args, rclpy, read_status,  # noqa: E402
                             role_args, wait_poked, write_replay_file)

# reference name -> subscriber role options
REFERENCES = {"eager": {"convert": True}, "multithreaded": {"executor": "multi"}}

MODES = {
    # name: (image_transport, depth streamed and subscribed, depth size divisor per side)
    "raw": ("raw", True, 1),                       # 1080p rgb8 + 1080p 16UC1 depth + CameraInfo
    "compressed": ("compressed", True, 1),         # JPEG 1080p + 1080p 16UC1 depth + CameraInfo
    "compressed_depth_half": ("compressed", True, 2),  # JPEG 1080p + 960x540 16UC1 depth + CameraInfo
    "compressed_nodepth": ("compressed", False, 1),    # JPEG 1080p only (use_depth:=false)
}


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def minor_faults(proc: psutil.Process) -> int:
    """Minor page faults so far (Linux /proc; 0 elsewhere): fresh memory touched, e.g. a new buffer per frame."""
    try:
        return int(open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[7])
    except (OSError, IndexError, ValueError):
        return 0


def wakeups(proc: psutil.Process) -> int:
    switches = proc.num_ctx_switches()
    return switches.voluntary + switches.involuntary


def measure_mode(mode: str, args, asker: Asker, replay, references: list[str]) -> dict:
    transport, depth, divisor = MODES[mode]
    compressed = transport == "compressed"
    cameras = f"default:{args.width}x{args.height}"
    depth_size = f"{args.width // divisor}x{args.height // divisor}" if depth else ""
    run = f"{mode}-with-references" if references else mode     # each pass its own status files
    status = {name: SCRATCH / f"{run}-{name}.json" for name in ("publisher", "bare", "node", *references)}
    with Processes(SCRATCH) as kids:
        node = kids.start(probed_node_args(status["node"], backend="replay", replay_file=str(replay),
                                           image_transport=transport, use_depth=depth,
                                           keep_frame_memory=args.keep_frame_memory == "true"), f"node-{run}")
        bare = kids.start(role_args("subscriber", status["bare"], cameras=cameras, compressed=compressed,
                                    no_depth=not depth), f"bare-{run}")
        others = {name: kids.start(role_args("subscriber", status[name], cameras=cameras, compressed=compressed,
                                             no_depth=not depth, **REFERENCES[name]), f"{name}-{run}")
                  for name in references}
        publisher = kids.start(role_args("publisher", status["publisher"], cameras=cameras, rate=args.rate,
                                         compressed=compressed, no_depth=not depth,
                                         depth_size=depth_size or False), f"publisher-{run}")
        asker.wait_ready(node, timeout=60.0, question=QUESTION, options=OPTIONS)
        wait_poked(status["bare"], "default_colour", bare, timeout=30.0)
        for name, child in others.items():
            wait_poked(status[name], "default_colour", child, timeout=30.0)
        time.sleep(args.warmup)
        children = {"node": node, "bare": bare, "publisher": publisher, **others}
        procs = {name: psutil.Process(child.pid) for name, child in children.items()}

        def snapshot() -> dict:
            # node and bare write their counts only when poked (nothing periodic inside the measured processes)
            return {k: (read_status(v) if k == "publisher" else poke_status(v, children[k])) for k, v in status.items()}

        windows = []
        for _ in range(args.windows):
            start = {k: cpu_seconds(p) for k, p in procs.items()}
            faults0 = {k: minor_faults(p) for k, p in procs.items()}
            wakes0 = {k: wakeups(p) for k, p in procs.items()}
            counts0 = snapshot()
            t0 = time.monotonic()
            time.sleep(args.seconds / args.windows)
            t1 = time.monotonic()
            end = {k: cpu_seconds(p) for k, p in procs.items()}
            faults1 = {k: minor_faults(p) for k, p in procs.items()}
            wakes1 = {k: wakeups(p) for k, p in procs.items()}
            counts1 = snapshot()
            span = t1 - t0
            window = {k: (end[k] - start[k]) / span for k in procs}
            window.update({f"{k}_faults_per_s": (faults1[k] - faults0[k]) / span for k in procs})
            window.update({f"{k}_switches_per_s": (wakes1[k] - wakes0[k]) / span for k in procs})

            def rate(who: str, key: str) -> float:
                # status files are written about twice a second: counts are exact, their timing +-0.5 s
                return (counts1[who].get(key, 0) - counts0[who].get(key, 0)) / span
            window["bare_colour_hz"] = rate("bare", "default_colour")
            window["bare_depth_hz"] = rate("bare", "default_depth")
            window["node_colour_hz"] = rate("node", "default_colour")
            window["published_hz"] = rate("publisher", "default_published")
            windows.append(window)
        # still answering on a fresh frame after the measurement: it kept receiving the stream throughout
        response, _ = asker.timed_call(asker_request(), timeout=30.0)
        jpeg = read_status(status["publisher"]).get("default_jpeg_bytes")
    ratios = [w["node"] / w["bare"] for w in windows if w["bare"] > 0]
    return {
        "mode": mode, "transport": transport, "depth": depth_size or "none", "size": f"{args.width}x{args.height}",
        "rate_hz": args.rate, "jpeg_bytes": jpeg,
        "node_core_fraction": statistics.median(w["node"] for w in windows),
        "bare_core_fraction": statistics.median(w["bare"] for w in windows),
        "publisher_core_fraction": statistics.median(w["publisher"] for w in windows),
        "ratio_node_to_bare_median": statistics.median(ratios) if ratios else float("nan"),
        "ratio_node_to_bare_per_window": ratios,
        "bare_colour_hz": statistics.median(w["bare_colour_hz"] for w in windows),
        "bare_depth_hz": statistics.median(w["bare_depth_hz"] for w in windows),
        "node_colour_hz": statistics.median(w["node_colour_hz"] for w in windows),
        "dds_transport": args.dds_transport,
        "node_faults_per_s": statistics.median(w["node_faults_per_s"] for w in windows),
        "bare_faults_per_s": statistics.median(w["bare_faults_per_s"] for w in windows),
        "node_switches_per_s": statistics.median(w["node_switches_per_s"] for w in windows),
        "bare_switches_per_s": statistics.median(w["bare_switches_per_s"] for w in windows),
        "load_average": os.getloadavg(), "keep_frame_memory": args.keep_frame_memory,
        "published_hz": statistics.median(w["published_hz"] for w in windows),
        "references": {name: {
            "core_fraction": statistics.median(w[name] for w in windows),
            "ratio_to_bare_median": statistics.median(w[name] / w["bare"] for w in windows if w["bare"] > 0),
            "ratio_to_node_median": statistics.median(w[name] / w["node"] for w in windows if w["node"] > 0),
            "node_core_fraction_same_pass": statistics.median(w["node"] for w in windows),
            "bare_core_fraction_same_pass": statistics.median(w["bare"] for w in windows),
        } for name in references},
        "node_answered_after": bool(response.success), "node_answer_message": response.message,
        "windows": windows,
    }


def asker_request():
    from spatialthinker_ros.srv import AskSpatial

    return AskSpatial.Request(question=QUESTION, options=OPTIONS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="raw,compressed,compressed_depth_half,compressed_nodepth", help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--seconds", type=float, default=16.0, help="measured seconds per mode")
    parser.add_argument("--windows", type=int, default=4, help="the measured seconds are split into this many windows")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds after the first frames before measuring")
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--rate", type=float, default=30.0)
    parser.add_argument("--dds-transport", default="shm_large", choices=DDS_TRANSPORTS,
                        help="shm_large (default): Fast DDS shared memory with 64 MB segments, which delivers 1080p30; "
                             "default: Fast DDS as installed (loses most best-effort 1080p frames here)")
    parser.add_argument("--keep-frame-memory", choices=("true", "false"), default="true",
                        help="the node's keep_frame_memory parameter; false measures it with glibc's malloc defaults "
                             "(the node before that parameter)")
    parser.add_argument("--references", default="eager,multithreaded",
                        help=f"comma list of {', '.join(REFERENCES)}: subscribers of the designs the node does not use")
    parser.add_argument("--json", help="result file (default bench/results/idle_cpu.json)")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}")
    unknown = {r for r in args.references.split(",") if r} - set(REFERENCES)
    if unknown:
        parser.error(f"unknown references {sorted(unknown)}")

    use_dds_transport(args.dds_transport)     # before rclpy.init; children inherit it
    replay = write_replay_file(SCRATCH)
    rclpy.init()
    asker = Asker()
    results = []
    references = [r for r in args.references.split(",") if r]
    try:
        for mode in modes:
            print(f"[idle_cpu] {mode}: publisher + node + bare subscriber, {args.seconds:.0f} s measured ...",
                  file=sys.stderr, flush=True)
            results.append(measure_mode(mode, args, asker, replay, []))
            if references:
                print(f"[idle_cpu] {mode}: again with the {' and '.join(references)} subscribers ...",
                      file=sys.stderr, flush=True)
                results[-1]["references"] = measure_mode(mode, args, asker, replay, references)["references"]
    finally:
        asker.close()
        rclpy.try_shutdown()
        shutil.rmtree(SCRATCH, ignore_errors=True)

    rows = []
    for r in results:
        rows.append([r["mode"], r["size"], r["depth"], f"{r['published_hz']:.1f}",
                     f"{r['node_colour_hz']:.1f} / {r['bare_colour_hz']:.1f} / {r['bare_depth_hz']:.1f}",
                     f"{100 * r['node_core_fraction']:.1f}%", f"{100 * r['bare_core_fraction']:.1f}%",
                     f"{r['ratio_node_to_bare_median']:.2f}x", f"{100 * r['publisher_core_fraction']:.0f}%",
                     "yes" if r["node_answered_after"] else "NO",
                     f"{r['node_faults_per_s']:.0f} / {r['bare_faults_per_s']:.0f}",
                     f"{r['node_switches_per_s']:.0f} / {r['bare_switches_per_s']:.0f}"])
    print(f"\nidle CPU, {machine()}, {args.seconds:.0f} s per mode in {args.windows} windows "
          "(fraction of one core; ratio = median of per-window node/bare)")
    print(table(rows, ["mode", "colour", "depth", "pub Hz", "rx Hz node/bare/bare depth", "node CPU", "bare CPU", "node/bare",
                       "publisher CPU", "node answered after", "page faults/s node/bare", "ctx switches/s node/bare"]))
    references = [[r["mode"], name, f"{100 * ref['core_fraction']:.1f}%",
                   f"{100 * ref['node_core_fraction_same_pass']:.1f}%", f"{100 * ref['bare_core_fraction_same_pass']:.1f}%",
                   f"{ref['ratio_to_node_median']:.2f}x", f"{ref['ratio_to_bare_median']:.2f}x"]
                  for r in results for name, ref in r["references"].items()]
    if references:
        print("\nthe designs the node does not use, same run (eager: every frame converted on arrival; "
              "multithreaded: bare subscriber on a MultiThreadedExecutor)")
        print(table(references, ["mode", "reference", "its CPU", "node CPU", "bare CPU", "it / node", "it / bare"]))
    path = write_results("idle_cpu", {"args": vars(args), "modes": results}, args.json)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
