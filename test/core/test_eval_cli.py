"""spatialthinker-eval as installed, run as a user runs it: every format with exact accuracies through the replay
backend, recordings in both storages, bad rows, the tiny checkpoint killed mid-run and resumed, Ctrl-C,
`transformers serve`, and compare."""

import dataclasses
import json
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest

import eval_data
from eval_data import EXPECTED, ROWS
from spatialthinker_ros.testing.http_server import ScriptedHandler, local_http_server

from spatialthinker_ros.testing.processes import Process, installed_executable, wait_for

pytestmark = pytest.mark.timeout(300)

EVAL = installed_executable("spatialthinker-eval")


def run_eval(*args, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(EVAL), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def predictions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("builder", sorted(eval_data.FORMAT_BUILDERS))
def test_replay_gives_exact_accuracies_in_every_format(builder, tmp_path: Path):
    path, questions = eval_data.FORMAT_BUILDERS[builder](tmp_path)
    replay = eval_data.write_replay(tmp_path / "replay.jsonl", questions)
    out = tmp_path / "out"
    done = run_eval("run", path, "--out", out, "--backend", "replay", "--replay-file", replay, "--no-progress")
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["total"], summary["scored"], summary["skipped"], summary["pending"]) == (9, 9, 0, 0)
    assert summary["correct"] == EXPECTED["correct"] and summary["accuracy"] == pytest.approx(EXPECTED["accuracy"])
    assert summary["unmatched"] == EXPECTED["unmatched"]
    names = eval_data.category_names(builder)
    for category, (total, correct) in EXPECTED["categories"].items():
        figures = summary["categories"][names[category]]
        assert (figures["total"], figures["correct"]) == (total, correct)
    assert summary["macro_accuracy"] == pytest.approx(EXPECTED["macro"])
    assert summary["status"] == {"complete": 7, "partial": 2}     # "banana" and no <answer> lose content
    rows = predictions(out)
    assert [r["correct"] for r in rows] == [row.correct for row in ROWS]
    assert [r["choice"] for r in rows] == ["A", "B", "C", "", "A", "A", "", "A", "B"]
    assert rows[3]["problems"] == ["answer does not name one of the options"]
    assert [row["option_probabilities"] for row in rows] == [pytest.approx(eval_data.probabilities(r))
                                                             for r in eval_data.ROWS]
    # the summary table printed on stdout
    assert "| **overall** | 9 | 6 | 66.7 % |" in done.stdout
    # a rerun asks nothing again
    again = run_eval("run", path, "--out", out, "--backend", "replay", "--replay-file", replay, "--no-progress")
    assert again.returncode == 0, again.stderr
    assert len(predictions(out)) == 9 and json.loads((out / "summary.json").read_text())["correct"] == 6


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_recordings_in_both_storages_give_3d_positions(storage, tmp_path: Path):
    bag = eval_data.write_recording(tmp_path / "bag", storage, compressed=storage == "mcap")
    path = eval_data.recording_jsonl(tmp_path, bag)
    replay = eval_data.DATA / eval_data.META["replay_file"]
    out = tmp_path / "out"
    done = run_eval("run", path, "--out", out, "--backend", "replay", "--replay-file", replay, "--no-progress")
    assert done.returncode == 0, done.stderr
    scene, early = predictions(out)
    assert scene["correct"] and scene["image_size"] == [640, 480]
    assert early["correct"] and early["image_size"] == list(eval_data.frame_size(1))
    for obj in scene["objects"]:
        centre = eval_data.META["objects"][obj["id"]]["centre_m"]
        assert obj["position_m"] == pytest.approx(centre, abs=0.06), obj["id"]
    assert all("position_m" not in obj for obj in early["objects"])


def test_bad_rows_are_skipped_with_reasons_and_never_stop_the_run(tmp_path: Path):
    path, questions = eval_data.project_jsonl(tmp_path)
    (tmp_path / "frame2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")        # undecodable
    (tmp_path / "frame4.png").unlink()                                              # missing
    with path.open("a") as out:
        out.write("{not json\n")
        out.write(json.dumps({"index": "noopt", "question": "q", "options": [], "answer": "A",
                              "image": "frame0.png"}) + "\n")
        out.write(json.dumps({"index": "badkey", "question": "q", "options": ["left", "right"], "answer": "up",
                              "image": "frame0.png"}) + "\n")
    replay = eval_data.write_replay(tmp_path / "replay.jsonl", questions)
    out = tmp_path / "out"
    done = run_eval("run", path, "--out", out, "--backend", "replay", "--replay-file", replay, "--no-progress")
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["total"], summary["scored"], summary["skipped"]) == (12, 7, 5)
    reasons = {r["index"]: r["reason"] for r in summary["skipped_rows"]}
    assert reasons["r2"] == "the image (18 bytes) cannot be decoded"
    assert reasons["r4"].startswith("cannot read image") and "frame4.png" in reasons["r4"]
    assert reasons["10"].startswith("line 10 is not valid JSON")
    assert reasons["noopt"] == "no options (neither a list nor (A) ... (B) ... in the question)"
    assert reasons["badkey"] == "answer 'up' is not one of its 2 options"
    assert summary["correct"] == 4          # rows 0, 1, 7 and 8; rows 2 and 4 (both right) were skipped
    assert "| r2 | the image (18 bytes) cannot be decoded |" in (out / "summary.md").read_text()


def big_dataset(folder: Path, rows: int) -> Path:
    """Many rows on the sample scene, for runs long enough to interrupt."""
    (folder / "scene.png").write_bytes(eval_data.SAMPLE_PNG)
    path = folder / "many.jsonl"
    path.write_text("".join(json.dumps({"index": f"q{i}", "question": f"Question {i}: where is the mug?",
                                        "options": ["left", "right"], "answer": "A", "category": f"c{i % 2}",
                                        "image": "scene.png"}) + "\n" for i in range(rows)))
    return path


@dataclasses.dataclass
class _GateState:
    asked: list[str] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    release: threading.Event = dataclasses.field(default_factory=threading.Event)
    open: int = 0


class _Gate(ScriptedHandler):
    """An OpenAI-compatible server that answers the first `state.open` requests at once and holds the rest
    until `state.release` is set: a run that is certainly mid-way when the test stops it."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        asked = re.search(r"Question (\d+):", json.dumps(body)).group(1)
        with self.server.state.lock:
            self.server.state.asked.append(f"q{asked}")
            held = len(self.server.state.asked) > self.server.state.open
        if held:
            self.server.state.release.wait(60)
        text = "<observe> a mug </observe><scene> {\"objects\": []} </scene><think> left </think><answer> (A) left </answer>"
        payload = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                           "finish_reason": "stop"}],
                              "usage": {"prompt_tokens": 50, "completion_tokens": 12}}).encode()
        try:
            self._send(200, payload)
        except (BrokenPipeError, ConnectionResetError):   # the killed client is gone
            pass


@pytest.fixture
def gate():
    with local_http_server(_Gate, _GateState()) as server:
        try:
            yield server
        finally:
            server.state.release.set()   # a held request lets go before the server shuts down


def gated_run(path: Path, out: Path, gate) -> list[str]:
    return [str(EVAL), "run", str(path), "--out", str(out), "--backend", "openai", "--server-url",
            f"http://127.0.0.1:{gate.server_address[1]}/v1", "--model", "gate", "--concurrency", "1",
            "--no-progress"]


def test_killed_mid_run_resumes_without_asking_finished_rows(gate, tmp_path: Path):
    path, out = big_dataset(tmp_path, 12), tmp_path / "out"
    log = out / "predictions.jsonl"
    gate.state.open = 3
    proc = Process(gated_run(path, out, gate), tmp_path / "eval.log", name="spatialthinker-eval")
    try:
        wait_for(lambda: log.exists() and log.read_text().count("\n") == 3 and len(gate.state.asked) == 4, 120,
                 "three predictions and the fourth request held", process=proc)
        proc.stop(signal.SIGKILL, timeout=30)
    finally:
        proc.stop(signal.SIGKILL)   # stopped already unless the wait failed
    first = predictions(out)
    assert [r["index"] for r in first] == ["q0", "q1", "q2"]
    with log.open("a") as handle:               # as if the kill had cut a line short
        handle.write('{"index": "q3", "categ')
    gate.state.release.set()
    asked_before = len(gate.state.asked)
    done = subprocess.run(gated_run(path, out, gate), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(gate.state.asked[asked_before:]) == sorted(f"q{i}" for i in range(3, 12))   # finished rows not asked
    after = predictions(out)
    assert sorted(r["index"] for r in after) == sorted(f"q{i}" for i in range(12))        # each row once
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["scored"], summary["correct"], summary["pending"]) == (12, 12, 0)


def test_ctrl_c_stops_cleanly_and_keeps_finished_rows(gate, tmp_path: Path):
    path, out = big_dataset(tmp_path, 12), tmp_path / "out"
    log = out / "predictions.jsonl"
    gate.state.open = 2
    # Process logs stdout and stderr together; the shell sends stdout to a file of its own and then execs the eval
    # (same pid, default SIGINT from Process), so the log is stderr alone: what a failed wait shows, and what the
    # assertions below read apart from stdout.
    stdout_path = tmp_path / "eval.stdout"
    proc = Process(["sh", "-c", 'exec "$@" > "$0"', str(stdout_path), *gated_run(path, out, gate)],
                   tmp_path / "eval.stderr", name="spatialthinker-eval")
    try:
        wait_for(lambda: log.exists() and log.read_text().count("\n") == 2 and len(gate.state.asked) == 3, 120,
                 "two predictions and the third request held", process=proc)
        returncode = proc.stop(signal.SIGINT, timeout=60)   # at once: the held request is not waited for
    finally:
        proc.stop(signal.SIGKILL)   # stopped already unless the wait failed
    stdout, stderr = stdout_path.read_text(), proc.output()
    assert returncode == 130, stderr
    assert "interrupted after 2 rows; rerun the same command to resume" in stderr and "Traceback" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["scored"], summary["correct"], summary["pending"]) == (2, 2, 10)
    assert "| **overall** | 2 | 2 | 100.0 % |" in stdout


def test_tiny_checkpoint_end_to_end(tiny_checkpoint: Path, tmp_path: Path):
    path, _ = eval_data.vlmevalkit_parquet(tmp_path)
    out = tmp_path / "out"
    done = run_eval("run", path, "--out", out, "--model", tiny_checkpoint, "--device", "cpu", "--limit", "3",
                    "--max-new-tokens", "8", "--max-pixels", "50000", "--batch-size", "2", "--dtype", "float32",
                    "--verbose")
    assert done.returncode == 0, done.stderr
    # what answered, for a calibration from this run: the node's model options, resolved
    from spatialthinker_ros.core.checkpoint import checkpoint_fingerprint

    recorded = json.loads((out / "run.json").read_text())
    assert recorded["calibration_setup"] == {
        "model": str(tiny_checkpoint), "backend": "transformers", "checkpoint": checkpoint_fingerprint(str(tiny_checkpoint)),
        "dtype": "float32", "quantization": "none", "min_pixels": 3136, "max_pixels": 50000,
        "max_input_pixels": 2073600, "prompt_style": "model_card", "letters_continue": True}
    # --verbose logs the model loading, each line under this command's name
    assert "spatialthinker-eval: INFO: spatialthinker_ros.core.backends.transformers.generation: loaded" in done.stderr
    assert "spatialthinker-ask" not in done.stderr, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["scored"], summary["errors"], summary["skipped"]) == (3, 0, 0)   # any accuracy: random weights
    assert all(r["output"] and r["completion_tokens"] > 0 for r in predictions(out))


def test_transformers_serve_with_requests_in_flight(tiny_server: str, tiny_checkpoint: Path, tmp_path: Path):
    path, questions = eval_data.cvbench_jsonl(tmp_path)
    out = tmp_path / "out"
    done = run_eval("run", path, "--out", out, "--backend", "openai", "--server-url", tiny_server,
                    "--model", tiny_checkpoint, "--max-new-tokens", "8", "--concurrency", "3", "--limit", "5",
                    "--max-pixels", "50000")
    assert done.returncode == 0, done.stderr
    # the model the server reports serving (GET /v1/models), for a calibration from this run
    assert json.loads((out / "run.json").read_text())["calibration_setup"]["checkpoint"] == f"served {tiny_checkpoint}"
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["scored"], summary["errors"], summary["total"]) == (5, 0, 5)
    assert summary["latency_s"]["p50"] > 0 and summary["tokens_per_answer"] > 0
    assert summary["throughput_rows_per_s"] > 0
    assert "rows" in done.stderr                                  # the progress bar
    assert all(r["output"] for r in predictions(out))


def test_compare_two_runs_and_refuse_mixing_setups(tmp_path: Path):
    path, questions = eval_data.vlmevalkit_tsv(tmp_path)
    replay_a = eval_data.write_replay(tmp_path / "a.jsonl", questions)
    replay_b = tmp_path / "b.jsonl"           # every answer right
    replay_b.write_text("".join(json.dumps({"question": q, "response": eval_data.response(f"({row.key})")}) + "\n"
                                for q, row in zip(questions, ROWS)))
    for name, replay in (("a", replay_a), ("b", replay_b)):
        done = run_eval("run", path, "--out", tmp_path / name, "--backend", "replay", "--replay-file", replay,
                        "--no-progress")
        assert done.returncode == 0, done.stderr
    done = run_eval("compare", tmp_path / "a", tmp_path / "b")
    assert done.returncode == 0, done.stderr
    # B right on every row: 3 rows only B got right, none only A -> p = 2 / 2^3
    assert "| all rows | 9 | 66.7 % | 9 | 100.0 % | 9 | +33.3 pt | 0 | 3 | 0.25 |" in done.stdout
    assert "| relation | 4 | 75.0 % | 4 | 100.0 % | 4 | +25.0 pt | 0 | 1 | 1 |" in done.stdout
    figures = json.loads(run_eval("compare", tmp_path / "a", tmp_path / "b", "--json").stdout)
    assert figures[0]["p_value"] == 0.25 and figures[0]["only_b"] == 3
    mixed = run_eval("run", path, "--out", tmp_path / "a", "--backend", "replay", "--replay-file", replay_b)
    assert mixed.returncode == 2 and "holds a run with other settings (replay_file" in mixed.stderr
    assert f"{str(replay_a)!r} there, {str(replay_b)!r} now" in mixed.stderr, mixed.stderr


def test_a_run_that_answered_no_row_is_replaced_by_a_rerun_with_other_settings(tmp_path: Path):
    path, questions = eval_data.vlmevalkit_tsv(tmp_path)
    replay = eval_data.write_replay(tmp_path / "replay.jsonl", questions)
    out = tmp_path / "out"
    failed = run_eval("run", path, "--out", out, "--backend", "replay", "--replay-file", tmp_path / "typo.jsonl")
    assert failed.returncode == 2 and "typo.jsonl" in failed.stderr, failed.stderr
    assert (out / "run.json").exists(), "the failed run left its settings behind"
    done = run_eval("run", path, "--out", out, "--backend", "replay", "--replay-file", replay, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "run.json").read_text())["replay_file"] == str(replay)
    assert json.loads((out / "summary.json").read_text())["correct"] == EXPECTED["correct"]


def test_usage_errors_are_one_line(tmp_path: Path):
    path, _ = eval_data.project_jsonl(tmp_path)
    cases = [
        (["--node", "x", "--model", "m"], "--model: --node measures the node's own backend"),
        (["--node", "x", "--max-pixels", "401408", "--prompt-style", "training"],
         "--max-pixels, --prompt-style: --node measures the node's own backend"),
        (["--backend", "replay", "--replay-file", tmp_path / "r.jsonl", "--concurrency", "4"],
         "--concurrency applies to --backend openai and --node"),
        (["--backend", "replay", "--replay-file", tmp_path / "missing.jsonl"], "replay file"),
        (["--limit", "0"], "--limit must be at least 1"),
        (["--categories", "nothing"], "the data selection holds no rows of those categories"),
    ]
    (tmp_path / "r.jsonl").write_text("")
    for extra, message in cases:
        done = run_eval("run", path, "--out", tmp_path / "out", *extra)
        assert done.returncode == 2, (extra, done.stderr)
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    done = run_eval("run", tmp_path / "missing.tsv", "--out", tmp_path / "out2")
    assert done.returncode == 2 and "does not exist" in done.stderr


def test_run_help_says_what_timeout_means_for_an_evaluation():
    help_text = " ".join(run_eval("run", "--help").stdout.split())
    expected = "seconds per request, for --backend openai and --node only (default: openai 120 s, --node 600 s)"
    assert expected in help_text
    assert "no limit" not in help_text   # spatialthinker-ask's meaning: one answer, no deadline
