"""spatialthinker-eval: a deployment's accuracy on multiple-choice spatial questions, two runs compared, and
prediction sets calibrated.

`run` asks every row of a benchmark file or of the team's own recordings through the pipeline the node and
spatialthinker-ask use (any backend, the same options), or through a running node's ~/ask service with
--node, appending DIR/predictions.jsonl as it goes and writing DIR/summary.json and DIR/summary.md.
Rerunning with the same --out resumes. `compare` sets two runs side by side with an exact McNemar test.
`calibrate` turns runs' option probabilities into a split conformal calibration for the node's prediction sets.

Exit codes: 0 done, 2 bad usage or input, 3 the backend or node could not be reached, 130 interrupted
(finished rows are kept: rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

from spatialthinker_ros import cli_options as cli   # what the commands share
from spatialthinker_ros.cli_options import EXIT_BACKEND, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from spatialthinker_ros.evaluation.calibration import (ACCURACY_SHARE_PNG, RELIABILITY_PNG, calibrate,
                                                       calibration_markdown, calibration_summary, held_out_sets,
                                                       rows_with_probabilities, runs_rows, write_pictures)
from spatialthinker_ros.evaluation.data import FORMATS, Dataset, read_dataset
from spatialthinker_ros.evaluation.recordings import RecordingCache
from spatialthinker_ros.evaluation.runner import (Answerer, PipelineAnswerer, PredictionLog, bad_row_record,
                                                        evaluate, is_finished, read_predictions)
from spatialthinker_ros.evaluation.scoring import (compare, comparison_markdown, is_scored, latest_records,
                                                         summarize, summary_markdown)
from spatialthinker_ros.core.backends.openai_backend import OpenAIConfig
from spatialthinker_ros.core.backends.settings import DEFAULT_MODEL, backend_settings
from spatialthinker_ros.core.conformal import CalibrationSetup, setup_differences
from spatialthinker_ros.core.types import BackendError, BackendErrorKind

PROG = "spatialthinker-eval"
SERVER_CONCURRENCY = OpenAIConfig().max_concurrency   # in flight for openai and --node, unless --concurrency
NODE_WAIT_S = 30.0              # --node: how long the service may take to appear
NODE_TIMEOUT_S = 600.0          # --node: per request, unless --timeout (the node has its own request_timeout)
# What must match for a rerun with the same --out to resume rather than mix two setups in one file.
SETUP_KEYS = ("data", "format", "node", "backend", "model", "replay_file", "prompt_style", "max_input_pixels",
              "max_pixels", "min_pixels", "dtype", "quantization", "attn_implementation", "max_new_tokens")

EPILOG = """\
examples:
  # CV-Bench with the real model on this machine's GPU
  spatialthinker-eval run CV-Bench/test_2d.jsonl CV-Bench/test_3d.jsonl --out eval/7b --device cuda

  # the same questions, cheaper image size, against a shared server; then compare the two runs
  spatialthinker-eval run CV-Bench/test_2d.jsonl CV-Bench/test_3d.jsonl --out eval/7b-401k \\
      --backend openai --server-url http://gpu-box:8000/v1 --max-pixels 401408 --concurrency 16
  spatialthinker-eval compare eval/7b eval/7b-401k

  # prediction sets that hold the right option 90 % of the time: calibrate on one run, check on another
  spatialthinker-eval calibrate eval/robot-cal --coverage 0.9 --out calibration.json --test eval/robot-test

  # a deployed node, as deployed (its own backend and parameters)
  spatialthinker-eval run my_questions.jsonl --out eval/robot --node spatialthinker
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{run,compare,calibrate}")

    run = commands.add_parser("run", help="ask every row and score the answers", epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("data", nargs="+", type=Path, metavar="DATA",
                     help="benchmark or JSONL file(s): VLMEvalKit TSV/parquet, CV-Bench jsonl/parquet, "
                          "STVQA parquet, or the project's JSONL (images or rosbag2 recordings)")
    run.add_argument("--out", required=True, type=Path, metavar="DIR",
                     help="folder for predictions.jsonl, summary.json and summary.md; reuse it to resume")
    rows = run.add_argument_group("rows")
    rows.add_argument("--format", choices=FORMATS, default="auto",
                      help="data format (default: from the file's extension and columns)")
    rows.add_argument("--limit", type=int, metavar="N", help="only the first N rows (after --categories)")
    rows.add_argument("--categories", nargs="+", default=[], metavar="NAME", help="only rows of these categories")
    cli.add_model_arguments(run, run.add_argument_group("prompt"), timeout_help=(
        "seconds per request, for --backend openai and --node only (default: openai "
        f"{OpenAIConfig().timeout_s:g} s, --node {NODE_TIMEOUT_S:g} s)"))
    running = run.add_argument_group("running")
    running.add_argument("--node", metavar="NAME",
                         help="ask a running node's NAME/ask service instead of a backend in this process "
                              "(the node's own backend and parameters answer; backend options do not apply)")
    running.add_argument("--concurrency", type=int, metavar="N",
                         help=f"requests in flight (openai and --node; default {SERVER_CONCURRENCY}); in-process "
                              "backends answer one batch at a time")
    running.add_argument("--batch-size", type=int, metavar="N",
                         help="rows per generate() call for in-process backends (default: the backend's maximum)")
    running.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    running.add_argument("-v", "--verbose", action="store_true", help="log model loading and library warnings")

    comp = commands.add_parser("compare", help="two runs side by side, with an exact McNemar test",
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    comp.add_argument("run_a", type=Path, metavar="DIR_A", help="the --out folder of the first run")
    comp.add_argument("run_b", type=Path, metavar="DIR_B", help="the --out folder of the second run")
    comp.add_argument("--json", action="store_true", help="print JSON instead of a table")

    cal = commands.add_parser("calibrate", help="a split conformal calibration (calibration_file) from runs",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    cal.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                     help="--out folders of runs with option probabilities, all with the same setup")
    cal.add_argument("--coverage", type=float, default=0.9, metavar="C",
                     help="how often the prediction set must hold the right option (default 0.9)")
    cal.add_argument("--out", required=True, type=Path, metavar="FILE", help="the calibration JSON to write")
    cal.add_argument("--test", nargs="+", type=Path, default=[], metavar="RUN_DIR",
                     help="runs of other questions (same setup): print the sets' coverage and sizes on them")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    cli.quiet_libraries(getattr(args, "verbose", False), PROG)
    try:
        code = {"run": run_command, "compare": compare_command, "calibrate": calibrate_command}[args.command](args)
    except cli.UsageError as exc:
        return _fail(f"error: {exc}", EXIT_USAGE)
    except BackendError as exc:
        return _fail(f"backend error ({exc.kind.value}): {exc}", EXIT_BACKEND)
    if code == EXIT_INTERRUPTED:
        # Everything is on disk; requests still in flight (a server's, a model's generate) are abandoned
        # rather than waited for, which interpreter exit would do for the backend's own worker threads.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def run_command(args: argparse.Namespace) -> int:
    """Validate, read the rows, resume the log, ask what is left, write the summary (also when interrupted)."""
    _check_run_arguments(args)
    config = cli.pipeline_config(args)
    recordings = RecordingCache()
    try:
        dataset = read_dataset(args.data, args.format, args.categories, args.limit, recordings)
    except ValueError as exc:           # a file that cannot be read at all
        raise cli.UsageError(exc) from None
    if not dataset.items and not dataset.bad:
        raise cli.UsageError("the data selection holds no rows" + (" of those categories" if args.categories else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    setup = _setup(args, dataset)
    _check_same_setup(args.out, setup)
    try:
        log = PredictionLog(args.out / "predictions.jsonl")
    except ValueError as exc:           # not a predictions file
        raise cli.UsageError(exc) from None
    for row in dataset.bad:
        if log.records.get(row.index, {}).get("skipped") != row.reason:
            log.append(bad_row_record(row))
    todo = sum(1 for item in dataset.items if not is_finished(log.records.get(item.index)))
    total = len(dataset.items) + len(dataset.bad)
    started, interrupted = time.perf_counter(), False
    answerer: Optional[Answerer] = None
    try:
        if todo:
            answerer = _answerer(args, config)
            _record_answering_setup(args.out, answerer.answering_setup(vars(args)))
            _evaluate(dataset, answerer, log, todo, args.no_progress)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        log.close()
        recordings.close()
    # The file is the truth: an interrupt may land between a row's write and the log's own bookkeeping.
    records = _selected(latest_records(read_predictions(log.path)), dataset)
    answered = todo - sum(1 for item in dataset.items if not is_finished(records.get(item.index)))
    summary = summarize(records, total, time.perf_counter() - started, answered, meta=setup)
    summary["calibration"] = calibration_summary(records)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    markdown = summary_markdown(summary) + "\n".join(calibration_markdown(summary["calibration"])) + "\n"
    (args.out / "summary.md").write_text(markdown)
    print(markdown, end="")
    _write_pictures(records, args.out)   # after the summaries: a drawing that fails loses none of them
    if interrupted:
        return _fail(f"interrupted after {answered} rows; rerun the same command to resume", EXIT_INTERRUPTED)
    if answerer is not None:
        answerer.close()
    return EXIT_OK


def _write_pictures(records: dict[str, dict[str, Any]], folder: Path) -> None:
    """The reliability and accuracy-by-share-answered pictures; none (and none left from before) without rows that
    have probabilities and name an option. A drawing that fails is said on stderr; the summaries are written."""
    for name in (RELIABILITY_PNG, ACCURACY_SHARE_PNG):
        (folder / name).unlink(missing_ok=True)
    rows = [row for row in rows_with_probabilities(records)[0] if row.choice is not None]
    if rows:
        try:
            write_pictures(rows, folder)
        except Exception as exc:   # matplotlib's own failure (fonts, memory): the figures are in summary.*
            print(f"{PROG}: warning: the pictures could not be drawn ({type(exc).__name__}: {exc}); "
                  "summary.json and summary.md hold the figures", file=sys.stderr)


# Options --node cannot honour, since the node answers with its own parameters, unless left at their defaults.
_NODE_OWN_SETTINGS = ("backend", "prompt_style", "max_input_pixels", "min_pixels", "max_new_tokens", "dtype",
                      "quantization", "attn_implementation")


def _check_run_arguments(args: argparse.Namespace) -> None:
    for name in ("limit", "concurrency", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise cli.UsageError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    if args.node is not None:   # the node answers with its own parameters: a setting here would change nothing
        given = [f"--{n.replace('_', '-')}" for n in ("model", "device", "server_url", "replay_file", "max_pixels")
                 if getattr(args, n) is not None]
        given += [f"--{n.replace('_', '-')}" for n in _NODE_OWN_SETTINGS
                  if getattr(args, n) != cli.PARAMETERS_BY_NAME[n].default]
        if given or args.batch_size is not None:
            raise cli.UsageError(f"{', '.join(given) or '--batch-size'}: --node measures the node's own backend; "
                                 "backend options do not apply")
    elif args.timeout is not None and args.backend != "openai":
        raise cli.UsageError("--timeout applies to --backend openai and --node (in-process backends run to the end)")
    if args.concurrency is not None and args.node is None and args.backend != "openai":
        raise cli.UsageError("--concurrency applies to --backend openai and --node; in-process backends batch "
                             "(--batch-size)")


def _answerer(args: argparse.Namespace, config) -> Answerer:
    if args.node is not None:
        from spatialthinker_ros.evaluation.node_client import NodeAnswerer, NodeError

        try:
            return NodeAnswerer(args.node, args.concurrency or SERVER_CONCURRENCY, args.timeout or NODE_TIMEOUT_S,
                                wait_s=min(NODE_WAIT_S, args.timeout or NODE_WAIT_S))
        except NodeError as exc:
            raise BackendError(BackendErrorKind.UNAVAILABLE, str(exc)) from None
    settings = backend_settings(args.backend, cli.setting_values(args))
    if args.backend == "openai":
        settings["max_concurrency"] = args.concurrency or SERVER_CONCURRENCY
    backend = cli.load_backend(args.backend, settings)
    config = config.for_backend(backend)
    if args.backend == "openai":
        return PipelineAnswerer(backend, config, batch_size=1, concurrency=backend.max_batch_size)
    batch = min(args.batch_size or backend.max_batch_size, backend.max_batch_size)
    return PipelineAnswerer(backend, config, batch_size=batch, concurrency=1)


def _evaluate(dataset: Dataset, answerer: Answerer, log: PredictionLog, todo: int, quiet: bool) -> None:
    from tqdm import tqdm

    with tqdm(total=todo, desc="rows", unit="row", file=sys.stderr, disable=quiet, dynamic_ncols=True) as bar:
        correct = [0, 0]

        def on_row(record: dict[str, Any]) -> None:
            if is_scored(record):
                correct[0] += bool(record["correct"])
                correct[1] += 1
                bar.set_postfix_str(f"accuracy {correct[0] / correct[1]:.1%}", refresh=False)
            bar.update(1)

        evaluate(dataset.items, answerer, log, on_row)


def _selected(records: dict[str, dict[str, Any]], dataset: Dataset) -> dict[str, dict[str, Any]]:
    """The records of this selection's rows (a --limit or --categories run may share a folder)."""
    selected = {item.index for item in dataset.items} | {row.index for row in dataset.bad}
    return {index: record for index, record in records.items() if index in selected}


def _setup(args: argparse.Namespace, dataset: Dataset) -> dict[str, Any]:
    return {
        "data": [str(p) for p in args.data], "format": dataset.format, "node": args.node,
        "backend": "node" if args.node else args.backend,
        "model": None if args.node else (args.model or ("replay" if args.backend == "replay" else DEFAULT_MODEL)),
        "replay_file": None if args.node or args.replay_file is None else str(args.replay_file),
        "prompt_style": None if args.node else args.prompt_style,
        "max_input_pixels": None if args.node else args.max_input_pixels,
        "max_pixels": None if args.node else args.max_pixels,
        **{name: None if args.node else getattr(args, name)
           for name in ("min_pixels", "dtype", "quantization", "attn_implementation")},
        "max_new_tokens": None if args.node else args.max_new_tokens,
    }


def _record_answering_setup(folder: Path, answering: tuple[Optional[CalibrationSetup], str]) -> None:
    """run.json's calibration_setup: what answers (weights, resolved dtype, ...; a --node run's from the node), the
    setup a calibration from this run holds for; null with calibration_setup_problem saying why when unknown. Rows
    answered by another setup (other weights at the same path, say) are not resumed into."""
    setup, problem = answering
    path = folder / "run.json"
    recorded = json.loads(path.read_text())
    now = asdict(setup) if setup is not None else None
    before = recorded.get("calibration_setup")
    if before is not None and now != before and _holds_answers(folder / "predictions.jsonl"):
        differences = "; ".join(f"{k}: {before.get(k)!r} there, {now.get(k)!r} now" for k in before
                                if now is None or before.get(k) != now.get(k))
        raise cli.UsageError(f"{folder} holds rows answered by another setup ({differences or problem}); use "
                             "another --out")
    path.write_text(json.dumps(recorded | {"calibration_setup": now, "calibration_setup_problem": problem},
                               indent=2) + "\n")


def _check_same_setup(folder: Path, setup: dict[str, Any]) -> None:
    """A folder's rows all come from one setup. A run that finished no row (it failed to load its backend, say)
    is replaced by a rerun with other settings: it has nothing to mix in."""
    path, predictions = folder / "run.json", folder / "predictions.jsonl"
    if path.exists():
        previous = json.loads(path.read_text())
        differ = [k for k in SETUP_KEYS if previous.get(k) != setup.get(k)]
        if not differ:
            return
        if _holds_answers(predictions):
            changes = "; ".join(f"{k}: {previous.get(k)!r} there, {setup.get(k)!r} now" for k in differ)
            raise cli.UsageError(f"{folder} holds a run with other settings ({changes}); use another --out")
        predictions.unlink(missing_ok=True)   # only failed or skipped rows of the other setup
    path.write_text(json.dumps(setup, indent=2) + "\n")


def _holds_answers(predictions: Path) -> bool:
    """Whether predictions.jsonl answers any row (a file that is not one counts as holding answers: it is kept)."""
    if not predictions.exists():
        return False
    try:
        return any(is_finished(record) for record in read_predictions(predictions))
    except (ValueError, OSError):
        return True


def compare_command(args: argparse.Namespace) -> int:
    records = []
    for folder in (args.run_a, args.run_b):
        path = folder / "predictions.jsonl"
        if not path.is_file():
            raise cli.UsageError(f"{folder} holds no predictions.jsonl (not a spatialthinker-eval --out folder)")
        try:
            records.append(latest_records(read_predictions(path)))
        except ValueError as exc:
            raise cli.UsageError(exc) from None
    figures = compare(*records)
    if args.json:
        print(json.dumps([{**vars(f), "difference": f.difference, "p_value": f.p_value} for f in figures], indent=2))
    else:
        print(comparison_markdown(figures, str(args.run_a), str(args.run_b)), end="")
    return EXIT_OK


def calibrate_command(args: argparse.Namespace) -> int:
    """Calibrate on the runs' rows, write the file, and with --test report the sets on held-out runs."""
    try:
        setup, rows, left_out = runs_rows(args.runs)
        calibration = calibrate(rows, args.coverage, setup)
        if args.test:
            test_setup, test_rows, _ = runs_rows(args.test)
            difference = setup_differences(setup, test_setup, ("calibrated", "--test"))
            if difference:
                raise cli.UsageError(f"the --test runs have another setup ({difference}): the calibration does not "
                                     "hold for them")
            shared = {row.identity for row in rows} & {row.identity for row in test_rows}
            if shared:
                raise cli.UsageError(f"the --test runs share {len(shared)} row(s) with the calibration runs (the same "
                                     "question of the same data file): held-out figures need other questions")
            figures = held_out_sets(calibration, test_rows)
    except ValueError as exc:            # RunError, CalibrationError, a predictions.jsonl that is not one
        raise cli.UsageError(exc) from None
    try:
        calibration.save(args.out, runs=[str(p) for p in args.runs])
    except OSError as exc:
        raise cli.UsageError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    left = "".join(f"; left out {count} rows: {reason}" for reason, count in left_out.items())
    print(f"calibrated on {calibration.n} rows of {len(args.runs)} run(s){left}")
    print(f"threshold {calibration.threshold:.6g} (sets hold options with p >= {1 - calibration.threshold:.6g}) "
          f"for coverage {calibration.coverage:g}; wrote {args.out}")
    if args.test:
        print(f"held-out: {figures.rows} rows, coverage {figures.coverage:.4f} (target {calibration.coverage:g}), "
              f"mean set size {figures.mean_set_size:.3f}, singleton sets {figures.singletons:.4f}, "
              f"empty sets {figures.empty:.4f}")
    return EXIT_OK


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
