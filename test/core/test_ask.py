"""The one ask flow (core/ask.py): the retry after out of memory, in the evaluation as in the node and the CLI."""

import json
import re
from pathlib import Path

import numpy as np

import spatialthinker_ros
from spatialthinker_ros.core.ask import AskFlow
from spatialthinker_ros.core.backends import create_backend
from spatialthinker_ros.core.pipeline import PipelineConfig
from spatialthinker_ros.core.sources import Source
from spatialthinker_ros.core.types import BackendError, BackendErrorKind, InferenceResult
from spatialthinker_ros.evaluation.data import EvalItem
from spatialthinker_ros.evaluation.runner import PipelineAnswerer

OPTIONS = ("left of", "right of")
# Boxes in the pixels of a 320x240 image: the half-size retry of a 640x480 frame.
RESPONSE = ('<scene>{"objects": [{"id": "cup.1", "bbox": [50, 50, 100, 100]}], "relationships": []}</scene>'
            "<answer>(A) left of</answer>")
FULL_SIZE = PipelineConfig(max_input_pixels=640 * 480)   # the model sees 640x480 frames at full size
OOM = BackendError(BackendErrorKind.OUT_OF_MEMORY, "CUDA out of memory")


def row(question: str, width: int = 640, height: int = 480) -> tuple[EvalItem, Source]:
    source = Source(np.full((height, width, 3), 128, np.uint8))
    return EvalItem(index=question, question=question, options=OPTIONS, answer="A", category="c",
                    load=lambda: source), source


def test_evaluation_retries_once_on_a_smaller_image_after_out_of_memory(tmp_path: Path):
    replay = tmp_path / "replay.jsonl"
    replay.write_text("\n".join(json.dumps(line) for line in (
        {"question": "oom once?", "error": "out_of_memory", "times": 1, "response": RESPONSE},
        {"question": "oom always?", "error": "out_of_memory"},
        {"question": "fine?", "response": RESPONSE},
    )) + "\n")
    answerer = PipelineAnswerer(create_backend("replay", replay_file=str(replay)), FULL_SIZE, batch_size=4,
                                concurrency=1)
    once, always, small, fine = answerer.answer(
        [row("oom once?"), row("oom always?"), row("oom always?", 320, 240), row("fine?", 320, 240)])
    assert once.error == "" and once.choice == "A", once.error
    # the retry really used the half-size image: its 320x240 boxes land at twice their size in the frame
    assert once.objects[0]["box"] == [100, 100, 200, 200]
    assert "out_of_memory" in always.error, always.error
    assert "out_of_memory" in small.error, "a small image fails without a retry"
    assert fine.error == "" and fine.objects[0]["box"] == [50, 50, 100, 100]


def test_the_flow_retries_once_and_only_after_out_of_memory():
    source = Source(np.zeros((480, 640, 3), np.uint8))
    retries = []
    flow = AskFlow(source, "Where?", OPTIONS, FULL_SIZE, on_retry=retries.append)
    assert flow.pending and flow.request.image.shape == (480, 640, 3)
    flow.record(OOM)
    assert flow.pending and flow.request.image.shape == (240, 320, 3) and retries == [flow.request]
    flow.record(OOM)
    assert not flow.pending and flow.outcome is OOM and len(retries) == 1
    other = AskFlow(source, "Where?", OPTIONS, FULL_SIZE)
    other.record(BackendError(BackendErrorKind.TIMEOUT, "slow"))
    assert not other.pending and other.request.image.shape == (480, 640, 3)
    done = AskFlow(source, "Where?", OPTIONS, FULL_SIZE)
    done.record(InferenceResult(text=RESPONSE.replace("50, 50, 100, 100", "100, 100, 200, 200")))
    assert done.finish("replay").parsed.choice == "A"


def test_only_the_ask_flow_prepares_and_retries_requests():
    package = Path(spatialthinker_ros.__file__).parent
    callers = {path.relative_to(package).as_posix() for path in package.rglob("*.py")
               if re.search(r"\b(prepare_request|smaller_request)\(", path.read_text())
               and path.name != "pipeline.py"}   # where they are defined (smaller_request calls prepare_request)
    assert callers == {"core/ask.py"}
