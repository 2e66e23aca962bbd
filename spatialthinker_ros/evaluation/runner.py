"""Asking every row, appending each answer as it comes, so a run can stop at any moment and resume.

predictions.jsonl holds one JSON object per line, written and flushed as each row finishes:
- asked rows: index, category, question, options (as offered), answer (the key's letter), output (raw
  model text), parsed_answer, choice (the letter the product's parser read; "" when none), correct,
  status (complete | partial | no_answer | error), problems, latency_s, prompt_tokens, completion_tokens,
  objects (boxes, and 3D positions when the row had depth), and error (why the request failed, if it did);
- rows that could not be asked: index, category, skipped (the reason).
A rerun with the same file asks only rows that have no record, or whose last record is skipped or failed:
a finished row is never asked again. A line cut short by a kill is dropped on resume.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Sequence

from spatialthinker_ros.core.backends.base import Backend
from spatialthinker_ros.core.ask import AskFlow
from spatialthinker_ros.core.config import answering_setup
from spatialthinker_ros.core.conformal import CalibrationSetup
from spatialthinker_ros.core.pipeline import PipelineConfig
from spatialthinker_ros.core.request import RequestError
from spatialthinker_ros.core.sources import Source
from spatialthinker_ros.evaluation.data import BadRow, EvalItem
from spatialthinker_ros.evaluation.errors import BadRowError
from spatialthinker_ros.evaluation.scoring import is_scored, latest_records
from spatialthinker_ros.core.types import BackendError, InferenceResult, ParsedResponse, SceneObject


@dataclass
class RowAnswer:
    """What a deployment answered for one row (or why it could not)."""

    output: str = ""
    parsed_answer: str = ""
    choice: str = ""
    status: str = "error"
    problems: Sequence[str] = ()
    latency_s: Optional[float] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    objects: list[dict[str, Any]] = field(default_factory=list)
    option_probabilities: Sequence[float] = ()   # in option order, summing to 1; () when the answer has none
    error: str = ""
    skipped: str = ""       # the row could not be asked (bad image, refused question): not scored
    image_size: Optional[tuple[int, int]] = None   # (width, height) of the row's image as loaded
    # answered at a smaller image size after running out of memory (the calibration does not hold for it); None:
    # not known (a --node answer whose node has no calibration, which would have said so)
    retried: Optional[bool] = False


class Answerer(Protocol):
    """Answers rows; `batch_size` rows per call, `concurrency` calls in flight from as many threads."""

    batch_size: int
    concurrency: int

    def answer(self, rows: Sequence[tuple[EvalItem, Source]]) -> list[RowAnswer]: ...

    def answering_setup(self, values: Mapping[str, Any]) -> tuple[Optional[CalibrationSetup], str]:
        """What answers (core/config.answering_setup; `values` as the node's parameters), or None and why it is
        not known: the setup a calibration from this run holds for."""

    def close(self) -> None:
        """Free what answering held (a model, connections)."""


class PipelineAnswerer:
    """The node's ask flow in this process (core/ask.py), rows batched: prepare -> backend.generate -> one retry
    of the rows that ran out of memory, on a smaller image -> finish."""

    def __init__(self, backend: Backend, config: PipelineConfig, batch_size: int, concurrency: int):
        self.backend, self.config = backend, config
        self.batch_size, self.concurrency = batch_size, concurrency

    def answering_setup(self, values: Mapping[str, Any]) -> tuple[Optional[CalibrationSetup], str]:
        try:
            return answering_setup(self.backend, values), ""
        except (ValueError, BackendError) as exc:
            return None, str(exc)

    def answer(self, rows: Sequence[tuple[EvalItem, Source]]) -> list[RowAnswer]:
        answers: list[Optional[RowAnswer]] = [None] * len(rows)
        flows: list[tuple[int, AskFlow]] = []
        for i, (item, source) in enumerate(rows):
            try:
                flows.append((i, AskFlow(source, item.question, list(item.options), self.config)))
            except RequestError as exc:
                answers[i] = RowAnswer(skipped=f"refused: {exc}")
        started = time.perf_counter()
        while pending := [flow for _, flow in flows if flow.pending]:
            try:
                outcomes: list[Any] = self.backend.generate([flow.request for flow in pending])
            except Exception as exc:   # a backend bug fails this batch, never the run
                outcomes = [exc] * len(pending)
            for flow, outcome in zip(pending, outcomes):
                flow.record(outcome)
        seconds = time.perf_counter() - started
        for i, flow in flows:
            outcome = flow.outcome
            if isinstance(outcome, BaseException):
                kind = f" ({outcome.kind.value})" if isinstance(outcome, BackendError) else ""
                answers[i] = RowAnswer(error=f"{type(outcome).__name__}{kind}: {outcome}", latency_s=seconds)
                continue
            result = flow.finish(self.backend.name)
            answers[i] = row_answer(result.parsed, result.inference, result.inference.seconds, flow.retried)
        return [a if a is not None else RowAnswer(error="no answer") for a in answers]

    def close(self) -> None:
        self.backend.close()


def row_answer(parsed: ParsedResponse, inference: InferenceResult, latency_s: float,
               retried: Optional[bool]) -> RowAnswer:
    """A parsed answer as a row's answer, in-process or from a node's SpatialAnswer alike."""
    return RowAnswer(
        retried=retried,
        output=inference.text, parsed_answer=parsed.answer, choice=parsed.choice,
        status=parsed.status.name.lower(), problems=list(parsed.problems), latency_s=latency_s,
        prompt_tokens=inference.prompt_tokens, completion_tokens=inference.completion_tokens,
        objects=[object_json(o) for o in parsed.scene.objects],
        option_probabilities=tuple(parsed.option_probabilities),
    )


def object_json(obj: SceneObject) -> dict[str, Any]:
    """One scene object of a prediction: box in the image's pixels, centre in metres when depth gave one."""
    box, position = obj.box, obj.position
    entry: dict[str, Any] = {"id": obj.id, "box": [round(v, 2) for v in (box.x_min, box.y_min, box.x_max, box.y_max)]}
    if position is not None:
        entry["position_m"] = [round(position.x, 4), round(position.y, 4), round(position.z, 4)]
        entry["depth_spread_m"] = round(position.depth_spread, 4)
        entry["depth_ambiguous"] = position.ambiguous
    return entry


class PredictionLog:
    """predictions.jsonl: read back on start (dropping a line cut short by a kill), appended row by row."""

    def __init__(self, path: Path):
        self.path = path
        self.records = latest_records(self._read())
        self._handle = path.open("a", encoding="utf-8")

    def _read(self) -> Iterable[dict[str, Any]]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete != len(data):                 # a kill mid-write: drop the partial line before appending
            with self.path.open("r+b") as handle:
                handle.truncate(complete)
        return read_predictions(self.path)

    def finished(self, index: str) -> bool:
        return is_finished(self.records.get(index))

    def append(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.records[str(record["index"])] = record

    def close(self) -> None:
        self._handle.close()


def is_finished(record: Optional[dict[str, Any]]) -> bool:
    """Whether a row's last record is an answer (a skipped or failed row is asked again on resume)."""
    return record is not None and is_scored(record) and not record.get("error")


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """The records of a predictions.jsonl, in order; a last line cut short by a kill is ignored."""
    text = path.read_bytes().decode("utf-8")
    lines = text.split("\n")[:-1]                # what follows the last newline is unfinished
    records = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                raise ValueError(f"{path}:{number}: not valid JSON; not a predictions file written by "
                                 "spatialthinker-eval") from None
    return records


def record_for(item: EvalItem, answer: RowAnswer) -> dict[str, Any]:
    """The predictions.jsonl line of an answered (or skipped) row."""
    if answer.skipped:
        return {"index": item.index, "category": item.category, "skipped": answer.skipped}
    record = {
        "index": item.index, "category": item.category, "question": item.question, "options": item.offered,
        "answer": item.answer, "output": answer.output, "parsed_answer": answer.parsed_answer,
        "choice": answer.choice, "correct": bool(answer.choice) and answer.choice == item.answer,
        "option_probabilities": list(answer.option_probabilities),
        "status": answer.status, "problems": list(answer.problems), "latency_s": answer.latency_s,
        "prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
        "objects": answer.objects, "image_size": list(answer.image_size) if answer.image_size else None,
        "retried": answer.retried,
    }
    if answer.error:
        record["error"] = answer.error
    return record


def bad_row_record(row: BadRow) -> dict[str, Any]:
    return {"index": row.index, "category": "", "skipped": row.reason}


def evaluate(items: Sequence[EvalItem], answerer: Answerer, log: PredictionLog,
             on_row: Callable[[dict[str, Any]], None] = lambda record: None) -> None:
    """Ask every unfinished row; each record is appended (and passed to on_row) as it comes. Workers are daemon
    threads, so Ctrl-C (KeyboardInterrupt here) stops at once: finished rows are already on disk and an
    interrupted batch is asked again on resume."""
    todo = [item for item in items if not log.finished(item.index)]
    batches: queue.Queue = queue.Queue()
    for start in range(0, len(todo), answerer.batch_size):
        batches.put(todo[start:start + answerer.batch_size])
    results: queue.Queue = queue.Queue()
    workers = min(answerer.concurrency, batches.qsize())
    for n in range(workers):
        threading.Thread(target=_work, args=(batches, results, answerer), name=f"spatialthinker-eval-{n}",
                         daemon=True).start()
    for _ in range(len(todo)):
        record = results.get()
        log.append(record)
        on_row(record)


def _work(batches: queue.Queue, results: queue.Queue, answerer: Answerer) -> None:
    while True:
        try:
            batch = batches.get_nowait()
        except queue.Empty:
            return
        rows = []
        for item in batch:
            try:
                frame = item.load()
            except BadRowError as exc:
                results.put(record_for(item, RowAnswer(skipped=str(exc))))
                continue
            except Exception as exc:   # a decoder bug must cost one row, not the run
                results.put(record_for(item, RowAnswer(skipped=f"cannot load the image ({type(exc).__name__}: {exc})")))
                continue
            rows.append((item, frame))
        if not rows:
            continue
        try:
            answers = answerer.answer(rows)
        except Exception as exc:
            answers = [RowAnswer(error=f"{type(exc).__name__}: {exc}") for _ in rows]
        for (item, frame), answer in zip(rows, answers):
            answer.image_size = (frame.rgb.shape[1], frame.rgb.shape[0])
            results.put(record_for(item, answer))
