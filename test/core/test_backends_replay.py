"""ReplayBackend: recorded answers, matched on the question exactly, streamed in pieces."""

import concurrent.futures
import json
import time
from pathlib import Path

import numpy as np
import pytest

from spatialthinker_ros.core.backends.replay_backend import ReplayBackend, ReplayConfig
from spatialthinker_ros.core.prompt import Question
from spatialthinker_ros.core.types import BackendError, BackendErrorKind, InferenceRequest, InferenceResult

pytestmark = pytest.mark.timeout(30)

QUESTION = "Where is the cat relative to the couch? (A) on top of (B) in front of (C) behind (D) beside"
RESPONSE = (
    "<observe> A living room with a couch and a cat. </observe>\n"
    '<scene> {"objects": [{"id": "couch.1", "bbox": [50, 100, 400, 350]}, {"id": "cat.1", "bbox": [200, 300, 280, 400]}],'
    ' "relationships": [{"subject": "cat.1", "predicate": "in front of", "object": "couch.1"}]} </scene>\n'
    "<think> The cat is lower in the image than the couch. </think>\n"
    "<answer> (B) in front of </answer>"
)


@pytest.fixture
def replay_file(tmp_path: Path) -> Path:
    path = tmp_path / "answers.jsonl"
    lines = [
        json.dumps({"question": QUESTION, "response": RESPONSE, "source": "model card"}),
        "",
        json.dumps({"question": "How many cups?", "response": "<answer> 2 </answer>"}),
        json.dumps({"question": "How many cups?", "response": "<answer> 3 </answer>"}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _request(question: str, **kwargs) -> InferenceRequest:
    return InferenceRequest(
        image=np.zeros((480, 640, 3), np.uint8), prompt=f"Image size: 640 x 480\n\n{question}", question=question, **kwargs
    )


def test_recorded_response_is_returned_for_the_exact_question(replay_file: Path):
    backend = ReplayBackend(ReplayConfig(str(replay_file), model="SpatialThinker-7B (recorded)"))
    [result] = backend.generate([_request(QUESTION)])
    assert isinstance(result, InferenceResult)
    assert result.text == RESPONSE
    assert result.completion_tokens == len(RESPONSE.split())
    assert result.prompt_tokens == len(f"Image size: 640 x 480\n\n{QUESTION}".split())
    assert result.model == backend.model_name == "SpatialThinker-7B (recorded)"
    assert backend.name == "replay"


def test_first_line_for_a_question_wins(replay_file: Path):
    [result] = ReplayBackend(ReplayConfig(str(replay_file))).generate([_request("How many cups?")])
    assert result.text == "<answer> 2 </answer>"


def test_unknown_question_is_no_match_naming_it(replay_file: Path):
    backend = ReplayBackend(ReplayConfig(str(replay_file)))
    known, unknown = backend.generate([_request(QUESTION), _request("Where is the cat?")])
    assert known.text == RESPONSE
    assert isinstance(unknown, BackendError) and unknown.kind is BackendErrorKind.NO_MATCH
    assert str(unknown) == 'no recorded response for question "Where is the cat?"'


def test_scene_only_ends_at_the_scene(replay_file: Path):
    [result] = ReplayBackend(ReplayConfig(str(replay_file))).generate([_request(QUESTION, scene_only=True)])
    assert result.text == RESPONSE[: RESPONSE.index("</scene>") + len("</scene>")]
    assert result.text.endswith('"object": "couch.1"}]} </scene>')


def test_streaming_sends_growing_pieces_ending_with_the_result(replay_file: Path):
    seen: list[tuple[str, int]] = []
    [result] = ReplayBackend(ReplayConfig(str(replay_file))).generate(
        [_request(QUESTION, on_text=lambda text, tokens: seen.append((text, tokens)))]
    )
    assert len(seen) == 4
    assert seen[-1] == (result.text, result.completion_tokens)
    lengths = [len(text) for text, _ in seen]
    assert lengths == sorted(set(lengths)) and lengths[0] > 0
    assert all(RESPONSE.startswith(text) for text, _ in seen)


def test_a_failing_stream_consumer_does_not_cost_the_answer(replay_file: Path):
    calls = []

    def broken(text: str, tokens: int) -> None:
        calls.append(text)
        raise RuntimeError("consumer bug")

    [result] = ReplayBackend(ReplayConfig(str(replay_file))).generate([_request(QUESTION, on_text=broken)])
    assert result.text == RESPONSE
    assert len(calls) == 1


def test_latency_is_spent_once_per_batch(replay_file: Path):
    latency = 1.0
    backend = ReplayBackend(ReplayConfig(str(replay_file), latency_s=latency))
    started = time.perf_counter()
    results = backend.generate([_request(QUESTION)] * 3)
    elapsed = time.perf_counter() - started
    # one latency, with two latencies' margin for a loaded machine; three latencies in turn would take >= 3 s
    assert latency <= elapsed < 3 * latency, "three requests in one batch wait one latency, not three"
    assert all(result.seconds >= latency for result in results)


def test_a_held_line_generates_until_its_file_exists_and_says_when_it_started(tmp_path: Path):
    release, started = tmp_path / "release", tmp_path / "started"
    path = tmp_path / "held.jsonl"
    path.write_text(json.dumps({"question": QUESTION, "response": RESPONSE, "until_file": str(release),
                                "started_file": str(started)}) + "\n")
    backend = ReplayBackend(ReplayConfig(str(path), latency_s=60.0))
    assert not started.exists()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        generating = pool.submit(backend.generate, [_request(QUESTION)])
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert started.exists(), "a generation matching the line creates its started_file"
        with pytest.raises(concurrent.futures.TimeoutError):
            generating.result(timeout=0.2)          # held: nothing ends it but the file (or 60 s)
        release.touch()
        [result] = generating.result(timeout=30)
    assert result.text == RESPONSE
    # latency_s bounds the hold: a file that never appears costs the latency, no more
    short = ReplayBackend(ReplayConfig(str(path), latency_s=0.05))
    release.unlink()
    assert short.generate([_request(QUESTION)])[0].text == RESPONSE


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"question": "q", "response": ', "not valid JSON"),
        ('{"question": "q", "response": "r", "until_file": ""}', '"until_file" must be a non-empty path'),
        ('{"question": "q", "response": "r", "started_file": 7}', '"started_file" must be a non-empty path'),
        ('["q", "r"]', 'string "question" and "response"'),
        ('{"question": "q"}', 'string "question" and "response"'),
        ('{"question": "q", "response": 3}', 'string "question" and "response"'),
    ],
)
def test_malformed_line_is_rejected_at_load_naming_its_number(tmp_path: Path, line: str, problem: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "a", "response": "b"}) + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as raised:
        ReplayBackend(ReplayConfig(str(path)))
    assert f"{path}:3:" in str(raised.value) and problem in str(raised.value)


def test_missing_replay_file_is_rejected_naming_it(tmp_path: Path):
    with pytest.raises(ValueError, match="replay file .*missing.jsonl does not exist"):
        ReplayBackend(ReplayConfig(str(tmp_path / "missing.jsonl")))


@pytest.mark.parametrize("unset", ["", "  "])
def test_an_unset_replay_file_is_called_unset_not_missing(unset: str):
    with pytest.raises(ValueError, match="^replay_file is not set") as refused:
        ReplayBackend(ReplayConfig(replay_file=unset))
    assert "does not exist" not in str(refused.value)


def test_batch_limit_and_settings_are_checked(replay_file: Path):
    backend = ReplayBackend(ReplayConfig(str(replay_file), max_batch_size=2))
    with pytest.raises(ValueError, match="exceed max_batch_size 2"):
        backend.generate([_request(QUESTION)] * 3)
    with pytest.raises(ValueError):
        ReplayConfig(str(replay_file), latency_s=-1)
    with pytest.raises(ValueError):
        ReplayConfig(str(replay_file), max_batch_size=0)


# --- rehearsing failures: "error" and "times" -------------------------------------------------------------------


def _failures_file(tmp_path: Path, *records: dict) -> Path:
    path = tmp_path / "failures.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def test_error_line_fails_every_match_with_its_kind(tmp_path: Path):
    path = _failures_file(tmp_path, {"question": "down?", "error": "unavailable"}, {"question": QUESTION, "response": RESPONSE})
    backend = ReplayBackend(ReplayConfig(str(path)))
    for _ in range(3):
        failed, answered = backend.generate([_request("down?"), _request(QUESTION)])
        assert isinstance(failed, BackendError) and failed.kind is BackendErrorKind.UNAVAILABLE
        assert str(failed) == "replayed unavailable error"
        assert isinstance(answered, InferenceResult) and answered.text == RESPONSE, "other requests are unaffected"


@pytest.mark.parametrize("kind", [k for k in BackendErrorKind])
def test_times_fails_the_first_n_matches_then_answers(tmp_path: Path, kind: BackendErrorKind):
    path = _failures_file(tmp_path, {"question": QUESTION, "error": kind.value, "times": 2, "response": RESPONSE})
    backend = ReplayBackend(ReplayConfig(str(path)))
    first, second = backend.generate([_request(QUESTION), _request(QUESTION)])
    assert isinstance(first, BackendError) and first.kind is kind and str(first) == f"replayed {kind.value} error (1 of 2)"
    assert isinstance(second, BackendError) and str(second) == f"replayed {kind.value} error (2 of 2)"
    for _ in range(2):
        [result] = backend.generate([_request(QUESTION)])
        assert isinstance(result, InferenceResult) and result.text == RESPONSE
    # a new backend (the node's next configure) starts counting again
    [again] = ReplayBackend(ReplayConfig(str(path))).generate([_request(QUESTION)])
    assert isinstance(again, BackendError)


def test_a_failing_request_streams_nothing(tmp_path: Path):
    path = _failures_file(tmp_path, {"question": QUESTION, "error": "out_of_memory", "times": 1, "response": RESPONSE})
    seen: list[str] = []
    backend = ReplayBackend(ReplayConfig(str(path)))
    [failed] = backend.generate([_request(QUESTION, on_text=lambda text, tokens: seen.append(text))])
    assert isinstance(failed, BackendError) and failed.kind is BackendErrorKind.OUT_OF_MEMORY and seen == []
    [answered] = backend.generate([_request(QUESTION, on_text=lambda text, tokens: seen.append(text))])
    assert answered.text == RESPONSE and seen[-1] == RESPONSE


def test_raise_makes_generate_raise_for_the_whole_batch(tmp_path: Path):
    from spatialthinker_ros.core.backends.replay_backend import ReplayedCrash

    path = _failures_file(tmp_path, {"question": "crash", "error": "raise", "times": 1, "response": "ok"},
                          {"question": QUESTION, "response": RESPONSE})
    backend = ReplayBackend(ReplayConfig(str(path)))
    with pytest.raises(ReplayedCrash):
        backend.generate([_request(QUESTION), _request("crash")])
    assert [r.text for r in backend.generate([_request(QUESTION), _request("crash")])] == [RESPONSE, "ok"]


def test_failures_go_through_the_scheduler_to_their_callers(tmp_path: Path):
    """The node's path: a raising backend fails the batch as FAILED, and the next request is answered."""
    from spatialthinker_ros.core.scheduling import RequestScheduler

    path = _failures_file(tmp_path, {"question": "crash", "error": "raise", "times": 1, "response": "ok"})
    scheduler = RequestScheduler(ReplayBackend(ReplayConfig(str(path), max_batch_size=1)))
    try:
        with pytest.raises(BackendError) as raised:
            scheduler.submit(_request("crash")).future.result(timeout=5)
        assert raised.value.kind is BackendErrorKind.FAILED and "ReplayedCrash" in str(raised.value)
        assert scheduler.submit(_request("crash")).future.result(timeout=5).text == "ok"
    finally:
        assert scheduler.stop()


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"question": "q", "error": "melted"}, '"error" must be one of unavailable, timeout, out_of_memory'),
        ({"question": "q", "error": "failed", "times": 0, "response": "r"}, '"times" must be an integer >= 1'),
        ({"question": "q", "error": "failed", "times": True, "response": "r"}, '"times" must be an integer >= 1'),
        ({"question": "q", "error": "failed", "times": 1.5, "response": "r"}, '"times" must be an integer >= 1'),
        ({"question": "q", "error": "failed", "times": 2}, '"times" needs a "response"'),
        ({"question": "q", "response": "r", "times": 2}, '"times" needs an "error"'),
        ({"question": "q", "error": "failed", "response": 3}, '"response" must be a string'),
    ],
)
def test_malformed_failure_lines_are_rejected_at_load(tmp_path: Path, record: dict, problem: str):
    path = _failures_file(tmp_path, {"question": "a", "response": "b"}, record)
    with pytest.raises(ValueError) as raised:
        ReplayBackend(ReplayConfig(str(path)))
    assert f"{path}:2:" in str(raised.value) and problem in str(raised.value)


# ------------------------------------------------------------------------------------------ option probabilities
def _probabilities_file(tmp_path: Path, probabilities) -> Path:
    path = tmp_path / "probabilities.jsonl"
    path.write_text(json.dumps({"question": QUESTION, "response": RESPONSE, "option_probabilities": probabilities})
                    + "\n" + json.dumps({"question": "How many cups?", "response": "<answer> 2 </answer>"}) + "\n",
                    encoding="utf-8")
    return path


def test_option_probabilities_of_a_line_are_read_and_renormalised(tmp_path: Path):
    backend = ReplayBackend(ReplayConfig(str(_probabilities_file(tmp_path, [0.2, 0.5, 0.2, 0.104]))))
    [result] = backend.generate([_request(QUESTION)])   # four options inline in the question
    assert result.option_probabilities == pytest.approx([0.2 / 1.004, 0.5 / 1.004, 0.2 / 1.004, 0.104 / 1.004])
    assert sum(result.option_probabilities) == pytest.approx(1.0, abs=1e-12)
    assert result.option_probabilities_note == ""


def test_option_probabilities_follow_the_options_list_too(tmp_path: Path):
    path = tmp_path / "listed.jsonl"
    path.write_text(json.dumps({"question": "Where is it?", "response": "<answer> (A) left </answer>",
                                "option_probabilities": [0.75, 0.25]}) + "\n", encoding="utf-8")
    [result] = ReplayBackend(ReplayConfig(str(path))).generate(
        [_request("Where is it?", asked=Question("Where is it?", ("left", "right")))])
    assert result.option_probabilities == (0.75, 0.25)


def test_option_probabilities_that_do_not_fit_the_options_are_left_out_with_the_reason(tmp_path: Path):
    backend = ReplayBackend(ReplayConfig(str(_probabilities_file(tmp_path, [0.5, 0.5]))))
    [mismatched] = backend.generate([_request(QUESTION)])
    assert mismatched.option_probabilities == ()
    assert mismatched.option_probabilities_note == "the replay line has 2 option_probabilities for 4 options"
    [free_form] = backend.generate([_request("How many cups?")])
    assert (free_form.option_probabilities, free_form.option_probabilities_note) == ((), "")
    [without] = ReplayBackend(ReplayConfig(str(_failures_file(tmp_path, {"question": QUESTION, "response": RESPONSE})))
                              ).generate([_request(QUESTION)])
    assert without.option_probabilities == () and without.option_probabilities_note == (
        "the replay line has no option_probabilities")


@pytest.mark.parametrize(("probabilities", "problem"), [
    ([0.5, 0.6], "must sum to 1 (within 0.01), not 1.1"),
    ([1.2, -0.2], "finite and non-negative"),
    ([0.0, 0.0], "all zero"),
    ([], "a non-empty list of numbers"),
    ("0.5 0.5", "a non-empty list of numbers"),
    ([0.5, True], "a non-empty list of numbers"),
    ([0.5, "0.5"], "a non-empty list of numbers"),
])
def test_malformed_option_probabilities_are_rejected_at_load(tmp_path: Path, probabilities, problem: str):
    with pytest.raises(ValueError) as raised:
        ReplayBackend(ReplayConfig(str(_probabilities_file(tmp_path, probabilities))))
    assert ":1:" in str(raised.value) and problem in str(raised.value)


def test_non_finite_option_probabilities_are_rejected_at_load(tmp_path: Path):
    path = tmp_path / "nan.jsonl"
    path.write_text('{"question": "q", "response": "r", "option_probabilities": [NaN, 1.0]}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="finite and non-negative"):
        ReplayBackend(ReplayConfig(str(path)))
