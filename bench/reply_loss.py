"""Replies lost in transport: callers that ask the moment the node's service appears, with the CPU kept busy.

rmw_fastrtps sends a reply only once the server has matched the caller's reply reader, and waits for that match
at most the reply writer's `max_blocking_time`; past it the reply is dropped and the caller waits forever. Both
sides of the race are exercised, for the service and for the action (goal acceptance and result):

  restart  one long-lived caller; the node is started again and again and asked the moment its service appears
  fresh    the node runs; many short-lived caller processes each ask the moment they find the service

`--busy N` runs N CPU-bound processes beside it. `--reply-wait-ms MS` gives the node's reply writers that
`max_blocking_time` (through a copy of the shipped Fast DDS profile): a short wait stands in for a machine whose
discovery is slower than the wait, which is how the race shows on a loaded machine. What the node itself saw comes
from its ~/stats reply counters (spatialthinker_ros/ros/stats.py), read before each node stops: service replies
the transport dropped, resent and abandoned. The action server's drops are not counted there (rclpy sends those
replies itself: ros/replies.py); they show as lost goal acceptances and results on the caller's side.

    python -m bench.reply_loss --mode restart --runs 30 --busy 4
    python bench/reply_loss.py --mode fresh --runs 60 --parallel 4 --busy 4 --reply-wait-ms 0
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from spatialthinker_ros.distro import fastdds_profile_variable
from spatialthinker_ros.testing.isolation import isolate_ros, large_images_profile
from spatialthinker_ros.testing.node_client import NodeStats, new_context, spin_until
from spatialthinker_ros.testing.processes import Process, Processes, node_command

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "reply_loss.json"   # every run appended, with its --label
REPLY_TIMEOUT_S = 10.0        # replies here come in milliseconds (the node has no frame); 10 s means lost
STARTUP_TIMEOUT_S = 120.0
SETTLE_TIMEOUT_S = 20.0       # a dropped reply is resent for at most ros/replies.RESEND_FOR_S (10 s)
REPLY_COUNTERS = ("dropped", "resent", "abandoned")


def node_profile(scratch: Path, reply_wait_ms: int | None) -> Path:
    """The shipped profile, or a copy whose reply writers wait `reply_wait_ms` for the caller's reply reader."""
    shipped = large_images_profile()
    if reply_wait_ms is None:
        return shipped
    text = shipped.read_text()
    wait = (f"<max_blocking_time><sec>{reply_wait_ms // 1000}</sec>"
            f"<nanosec>{(reply_wait_ms % 1000) * 1_000_000}</nanosec></max_blocking_time>")
    writer = (f'<data_writer profile_name="service"><qos><reliability>{wait}</reliability></qos></data_writer>')
    text = re.sub(r'<data_writer profile_name="service">.*?</data_writer>', "", text, flags=re.S)
    text = text.replace("</profiles>", writer + "\n  </profiles>")
    path = scratch / "node_profile.xml"
    path.write_text(text)
    return path


def busy_processes(count: int, processes: Processes) -> list[Process]:
    return [processes.start([sys.executable, "-c", "while True: pass"], name="busy") for _ in range(count)]


def start_node(processes: Processes, scratch: Path, profile: Path) -> Process:
    replay = scratch / "replay.jsonl"
    replay.touch()
    return processes.start(node_command(backend="replay", replay_file=str(replay)), name="node",
                           env=dict(os.environ, **{fastdds_profile_variable(): str(profile)}))


def caller_outcome(output: str) -> dict:
    """What a --caller process printed last (its JSON line; ROS logging on stderr shares the log)."""
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"found": False}


# ----------------------------------------------------------------------------- caller side (rclpy from here on)
class Caller:
    """One ROS node with a service client and an action client, asking the moment both are found; with `stats`,
    it also receives the node's ~/stats."""

    def __init__(self, name: str, stats: bool = False):
        import rclpy
        from rclpy.action import ActionClient

        from spatialthinker_ros.action import AskSpatial as AskAction
        from spatialthinker_ros.srv import AskSpatial

        self.context = new_context()
        self.node = rclpy.create_node(name, context=self.context)
        self.srv_type, self.action_type = AskSpatial, AskAction
        self.service = self.node.create_client(AskSpatial, "/spatialthinker/ask")
        self.action = ActionClient(self.node, AskAction, "/spatialthinker/ask_action")
        self.stats = NodeStats(self.node) if stats else None

    def found(self, timeout: float) -> bool:
        return spin_until(self.node, lambda: self.service.service_is_ready() and self.action.server_is_ready(),
                          timeout)

    def ask_both(self) -> dict[str, bool]:
        """Service call and action goal sent together, at once; which replies arrived within REPLY_TIMEOUT_S."""
        call = self.service.call_async(self.srv_type.Request(question="Where is the cup?"))
        goal = self.action.send_goal_async(self.action_type.Goal(question="Where is the cup?"))
        result = []

        def on_goal(done) -> None:
            handle = done.result()
            if handle.accepted:
                result.append(handle.get_result_async())

        goal.add_done_callback(on_goal)
        spin_until(self.node, lambda: call.done() and goal.done() and result and result[0].done(),
                   REPLY_TIMEOUT_S)
        # a result is only asked for once the goal's acceptance has arrived
        return {"service": call.done(), "goal": goal.done(), "result": result[0].done() if result else None}

    def node_replies(self) -> dict[str, int]:
        """The node's reply counters once no reply waits for a resend (~/stats; counted since the node started).
        SystemExit if the node published none, or still had replies pending after SETTLE_TIMEOUT_S."""
        received = self.stats.received
        settled = spin_until(self.node, lambda: bool(received) and received[-1]["replies"]["pending"] == 0,
                             SETTLE_TIMEOUT_S)
        if not settled:
            raise SystemExit(f"the node's ~/stats did not settle: {received[-1] if received else 'none received'}")
        return {counter: self.stats.replies(counter) for counter in REPLY_COUNTERS}

    def close(self) -> None:
        import rclpy

        self.action.destroy()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)


def caller_process() -> int:
    """One short-lived caller: find the node, ask at once, print which replies arrived, exit."""
    caller = Caller(f"reply_loss_caller_{os.getpid()}")
    try:
        if not caller.found(STARTUP_TIMEOUT_S):
            print(json.dumps({"found": False}))
            return 1
        print(json.dumps({"found": True, **caller.ask_both()}))
        return 0
    finally:
        caller.close()


def tally(outcomes: list[dict], node_replies: list[dict[str, int]]) -> dict:
    """What the callers saw, and the service replies the nodes counted (summed over the nodes started)."""
    asked = [o for o in outcomes if o.get("found")]
    lost = {kind: sum(1 for o in asked if o[kind] is False) for kind in ("service", "goal", "result")}
    return {"asked": len(asked), "not_found": len(outcomes) - len(asked), "lost": lost,
            "node_replies": {counter: sum(r[counter] for r in node_replies) for counter in REPLY_COUNTERS}}


def run_restart(args, processes: Processes, scratch: Path, profile: Path) -> dict:
    caller = Caller("reply_loss_long_lived_caller", stats=True)
    outcomes, counted = [], []
    try:
        for i in range(args.runs):
            caller.stats.received.clear()   # the counters of the node about to start only
            node = start_node(processes, scratch, profile)
            try:
                outcomes.append({"found": caller.found(STARTUP_TIMEOUT_S)})
                if outcomes[-1]["found"]:
                    outcomes[-1].update(caller.ask_both())
                    counted.append(caller.node_replies())
            finally:
                node.stop()
            # the next node must be found anew, not the one just stopped
            spin_until(caller.node, lambda: not caller.service.service_is_ready(), 10.0)
            print(f"restart {i + 1}/{args.runs}: {outcomes[-1]}", flush=True)
    finally:
        caller.close()
    return tally(outcomes, counted)


def run_fresh(args, processes: Processes, scratch: Path, profile: Path) -> dict:
    node = start_node(processes, scratch, profile)
    outcomes = []
    probe = Caller("reply_loss_probe", stats=True)   # finds the node, then reads its counters at the end
    try:
        if not probe.found(STARTUP_TIMEOUT_S):
            raise SystemExit("node did not come up:\n" + node.output())
        pending: list[Process] = []   # stopped by `processes` on any exit, a timeout included
        started = 0
        while started < args.runs or pending:
            while started < args.runs and len(pending) < args.parallel:
                pending.append(processes.start([sys.executable, str(Path(__file__).resolve()), "--caller"],
                                               name="caller"))
                started += 1
            waiting = pending.pop(0)
            waiting.popen.wait(timeout=STARTUP_TIMEOUT_S + 2 * REPLY_TIMEOUT_S)
            waiting.stop()   # it has exited: closes its log
            outcomes.append(caller_outcome(waiting.output()))
            print(f"caller {len(outcomes)}/{args.runs}: {outcomes[-1]}", flush=True)
        counted = probe.node_replies()
    finally:
        probe.close()
        node.stop()
    return tally(outcomes, [counted])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("restart", "fresh"), default="restart")
    parser.add_argument("--runs", type=int, default=30, help="node restarts, or caller processes")
    parser.add_argument("--parallel", type=int, default=4, help="fresh: caller processes at a time")
    parser.add_argument("--busy", type=int, default=4, help="CPU-bound processes beside the run")
    parser.add_argument("--reply-wait-ms", type=int, default=None,
                        help="the node's reply writers' max_blocking_time (default: the shipped profile's)")
    parser.add_argument("--label", default="", help="what this run measures (e.g. the commit), kept in the results")
    parser.add_argument("--json", type=Path, default=RESULTS, help="results file; each run is appended")
    parser.add_argument("--caller", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.caller:
        return caller_process()
    scratch = isolate_ros(prefix="spatialthinker-reply-loss-")
    try:
        profile = node_profile(scratch, args.reply_wait_ms)
        # every process started here (busy, nodes, callers) is stopped by its pid on any exit, newest first
        with Processes(scratch) as processes:
            busy_processes(args.busy, processes)
            began = time.monotonic()
            result = (run_restart if args.mode == "restart" else run_fresh)(args, processes, scratch, profile)
        result.update(mode=args.mode, runs=args.runs, busy=args.busy, cores=os.cpu_count(),
                      reply_wait_ms=args.reply_wait_ms, seconds=round(time.monotonic() - began, 1),
                      label=args.label, date=time.strftime("%Y-%m-%d"), load_average=os.getloadavg())
        print(json.dumps(result))
        runs = json.loads(args.json.read_text()) if args.json.exists() else []
        args.json.write_text(json.dumps(runs + [result], indent=1) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
