"""BackendRuntime: the backend's states, and a generation running across a stop, which cannot be interrupted:
starting again is refused, and releasing answers at once and frees the model once that generation has finished.

A held replay line makes a generation last until the test creates its release file, as a model's long generation
would: the test, not the clock, decides when it ends."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from spatialthinker_ros.core.runtime import BACKEND_STATES, BackendRuntime
from spatialthinker_ros.core.scheduling import SchedulerStopped, Ticket
from spatialthinker_ros.core.types import InferenceRequest, InferenceResult
from spatialthinker_ros.testing.processes import wait_for

pytestmark = pytest.mark.timeout(60)

WAIT_S = 20.0           # only reached when a test fails
SHORT_WAIT_S = 0.05     # a wait that ends while the generation is still held
QUESTION = "Where is the mug?"


def loaded_runtime(tmp_path: Path, held: bool = False, on_released=lambda: None) -> BackendRuntime:
    """A replay backend; `held`: each generation lasts until tmp_path / "release" exists (at most WAIT_S)."""
    replay = tmp_path / "replay.jsonl"
    line = {"question": QUESTION, "response": "<answer>left</answer>"}
    if held:
        line["until_file"] = str(tmp_path / "release")
    replay.write_text(json.dumps(line) + "\n")
    runtime = BackendRuntime(logging.getLogger("test_runtime"), on_released)
    runtime.load("replay", {"replay_file": str(replay), "latency_s": WAIT_S if held else 0.0})
    return runtime


def request(request_id: str) -> InferenceRequest:
    return InferenceRequest(image=np.zeros((2, 2, 3), np.uint8), prompt="prompt", question=QUESTION,
                            request_id=request_id)


def generation_running_across_a_stop(runtime: BackendRuntime) -> Ticket:
    """Start, take a request, stop while the backend generates its answer; that caller is answered at once."""
    assert runtime.start(queue_size=2)
    ticket = runtime.scheduler.submit(request("taken before the stop"))
    wait_for(lambda: ticket.state == "running", WAIT_S, "the generation to start")
    assert runtime.stop("node deactivated") and runtime.scheduler is None
    assert isinstance(ticket.future.exception(timeout=0), SchedulerStopped), "the caller is answered at once"
    assert runtime.stats().stopped == 1, "the stopped scheduler's counters while it still generates"
    return ticket


def test_backend_state_from_load_to_release(tmp_path: Path):
    runtime = BackendRuntime(logging.getLogger("test_runtime"))
    assert (runtime.state, runtime.model_name, runtime.stats()) == ("none", None, None)
    runtime = loaded_runtime(tmp_path)
    assert (runtime.state, runtime.model_name) == ("loaded", "replay")
    assert runtime.start(queue_size=2)
    answer = runtime.scheduler.submit(request("1")).future.result(timeout=WAIT_S)
    assert isinstance(answer, InferenceResult) and answer.text == "<answer>left</answer>"
    assert runtime.stats().completed == 1
    assert runtime.stop("node deactivated") and not runtime.stop("again"), "stopping twice stops once"
    assert runtime.release() and (runtime.state, runtime.backend, runtime.model_name) == ("released", None, None)
    assert not runtime.release(), "releasing twice releases once"
    assert runtime.state in BACKEND_STATES


def test_start_is_refused_while_a_generation_from_before_the_stop_runs(tmp_path: Path):
    runtime = loaded_runtime(tmp_path, held=True)
    generation_running_across_a_stop(runtime)
    # a second worker must never run on a backend still inside generate()
    assert not runtime.start(queue_size=2, wait_s=SHORT_WAIT_S) and runtime.scheduler is None
    # once that generation has ended, starting works and the new scheduler answers
    (tmp_path / "release").touch()
    assert runtime.start(queue_size=2, wait_s=WAIT_S)
    assert isinstance(runtime.scheduler.submit(request("2")).future.result(timeout=WAIT_S), InferenceResult)
    runtime.stop("done")
    assert runtime.release() and runtime.state == "released"


def test_release_answers_at_once_and_frees_the_model_once_the_running_generation_has_ended(tmp_path: Path):
    released_on = []
    runtime = loaded_runtime(tmp_path, True, lambda: released_on.append(threading.current_thread().name))
    generation_running_across_a_stop(runtime)
    assert runtime.release(), "returns while the generation is still held"
    assert runtime.state == "releasing" and runtime.backend is not None, "the backend stays open while it generates"
    assert runtime.stats().stopped == 1, "the counters stay readable meanwhile"
    assert not runtime.release(), "a release in progress is not started twice"
    assert not runtime.wait_released(SHORT_WAIT_S) and released_on == []
    (tmp_path / "release").touch()
    assert runtime.wait_released(WAIT_S), "freed once the generation has finished"
    assert (runtime.state, runtime.backend, runtime.stats()) == ("released", None, None)
    assert released_on == ["spatialthinker-release"], "told once, from the releasing thread"


def test_loading_again_closes_the_previous_backend_and_never_loads_on_top_of_a_generating_one(tmp_path: Path):
    runtime = loaded_runtime(tmp_path, held=True)
    first = runtime.backend
    generation_running_across_a_stop(runtime)
    with pytest.raises(ValueError, match="still generating"):
        runtime.load("replay", {"replay_file": str(tmp_path / "replay.jsonl")}, wait_s=SHORT_WAIT_S)
    assert runtime.backend is first and runtime.state == "releasing"
    (tmp_path / "release").touch()
    runtime.load("replay", {"replay_file": str(tmp_path / "replay.jsonl")}, wait_s=WAIT_S)
    assert runtime.backend is not first and runtime.state == "loaded"
