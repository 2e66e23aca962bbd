"""TransformersBackend on the tiny random Qwen2.5-VL checkpoint, on the CPU: the real loading and generation path."""

import json
import math
import weakref
from pathlib import Path
from typing import Union

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor

from spatialthinker_ros.core.backends.base import GenerationConfig
from spatialthinker_ros.core.backends.transformers import TransformersBackend, TransformersConfig
from spatialthinker_ros.core.parsing import parse_response
from spatialthinker_ros.core.prompt import Question, option_letter
from spatialthinker_ros.core.types import BackendError, BackendErrorKind, InferenceRequest, InferenceResult

pytestmark = pytest.mark.timeout(120)

FORCED = '<observe> a cup </observe> <scene> {"objects": []} </scene> <think> x </think> <answer> (A) </answer>'
SCENE_PART = '<observe> a cup </observe> <scene> {"objects": []} </scene>'


def _backend(checkpoint: Path, **overrides) -> TransformersBackend:
    settings = {"model": str(checkpoint), "device": "cpu", "max_pixels": None} | overrides
    return TransformersBackend(TransformersConfig(**settings))


@pytest.fixture(scope="module")
def backend(tiny_checkpoint: Path):
    """Exactly 16 new tokens per answer: a random model may otherwise end at once."""
    backend = _backend(tiny_checkpoint, generation=GenerationConfig(max_new_tokens=16, min_new_tokens=16))
    yield backend
    backend.close()


def _request(width: int, height: int, seed: int = 0, **kwargs) -> InferenceRequest:
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    prompt = (  # names the scene tags, as the real prompt does: the stop must look at generated text only
        "Visualise the relevant scene graph in <scene> </scene> tags."
        f"\n\nImage size: {width} x {height}\n\nWhere is the cup relative to the plate?"
    )
    return InferenceRequest(image=image, prompt=prompt, question="Where is the cup relative to the plate?", **kwargs)


def _image_tokens(width: int, height: int, min_pixels: int, max_pixels: int) -> int:
    """Qwen2.5-VL's smart_resize (factor 28), written out independently of transformers."""
    h, w = round(height / 28) * 28, round(width / 28) * 28
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / 28) * 28, math.floor(width / beta / 28) * 28
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / 28) * 28, math.ceil(width * beta / 28) * 28
    return h * w // (28 * 28)


def _text_tokens(backend: TransformersBackend, request: InferenceRequest) -> int:
    """Prompt tokens other than the image's: the chat template with one <|image_pad|> placeholder, minus it."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": request.prompt}]}]
    text = backend.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(backend.processor.tokenizer.encode(text, add_special_tokens=False)) - 1


class _ForceText(LogitsProcessor):
    """Makes every row generate FORCED and then <|im_end|>, so stopping can be checked on known text."""

    def __init__(self, token_ids: list[int], eos_id: int):
        self._sequence = token_ids + [eos_id]
        self._start = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._start = self._start or input_ids.shape[1]
        step = min(input_ids.shape[1] - self._start, len(self._sequence) - 1)
        forced = torch.full_like(scores, -math.inf)
        forced[:, self._sequence[step]] = 0.0
        return forced


class _Forcing:
    """For TransformersBackend.set_logits_processors: a fresh _ForceText of FORCED per generate call; `calls`
    counts them."""

    def __init__(self, backend: TransformersBackend):
        tokenizer = backend.processor.tokenizer
        self._ids = tokenizer.encode(FORCED, add_special_tokens=False)
        self._eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.calls = 0

    def __call__(self) -> list[LogitsProcessor]:
        self.calls += 1
        return [_ForceText(self._ids, self._eos)]


@pytest.fixture
def forced_backend(tiny_checkpoint: Path):
    """A backend whose model writes FORCED."""
    backend = _backend(tiny_checkpoint, generation=GenerationConfig(max_new_tokens=64))
    backend.set_logits_processors(_Forcing(backend))
    yield backend
    backend.close()


def test_defaults_on_cpu_are_float32_and_sdpa(backend: TransformersBackend, tiny_checkpoint: Path):
    assert (backend.device, backend.dtype, backend.attn_implementation) == ("cpu", "float32", "sdpa")
    assert backend.name == "transformers"
    assert backend.model_name == str(tiny_checkpoint)
    assert backend.max_batch_size == 8


def test_single_request_returns_text_and_exact_token_counts(backend: TransformersBackend, tiny_checkpoint: Path):
    request = _request(640, 480)
    [result] = backend.generate([request])
    assert isinstance(result, InferenceResult)
    assert result.completion_tokens == 16
    assert isinstance(result.text, str) and result.text.strip()
    # 640x480 under the tiny checkpoint's own max_pixels (50176): 168x252 pixels -> 54 image tokens
    assert _image_tokens(640, 480, 3136, 50176) == 54
    assert result.prompt_tokens == _text_tokens(backend, request) + 54
    assert result.model == str(tiny_checkpoint)
    assert 0 < result.seconds < 60


def test_max_pixels_bounds_the_image_tokens(backend: TransformersBackend, tiny_checkpoint: Path):
    limited = _backend(tiny_checkpoint, max_pixels=12544, generation=GenerationConfig(max_new_tokens=2))
    request = _request(640, 480)
    try:
        [result] = limited.generate([request])
    finally:
        limited.close()
    assert _image_tokens(640, 480, 3136, 12544) == 12    # 84x112 pixels
    assert result.prompt_tokens == _text_tokens(backend, request) + 12


def test_batch_of_three_sizes_in_one_generate_call_matches_each_alone(backend: TransformersBackend):
    requests = [_request(640, 480, seed=1), _request(40, 30, seed=2), _request(300, 500, seed=3)]
    alone = [backend.generate([request])[0] for request in requests]
    calls = []
    backend.set_logits_processors(lambda: calls.append(1) or [])   # asked once per model.generate call
    try:
        batched = backend.generate(requests)
    finally:
        backend.set_logits_processors(None)

    assert len(calls) == 1
    assert len(batched) == 3
    expected_image_tokens = [_image_tokens(w, h, 3136, 50176) for w, h in ((640, 480), (40, 30), (300, 500))]
    assert expected_image_tokens == [54, 6, 60]   # 40x30 is scaled up to min_pixels, 300x500 down
    for request, one, result, image_tokens in zip(requests, alone, batched, expected_image_tokens):
        assert result.prompt_tokens == one.prompt_tokens == _text_tokens(backend, request) + image_tokens
        assert result.completion_tokens == 16
        assert result.text == one.text      # left padding leaves greedy answers unchanged


class _PatchCounter:
    """Counts the patches the vision tower embeds: what encoding the images of a generate call cost."""

    def __init__(self, backend: TransformersBackend):
        self.patches = 0
        self._handle = backend.model.model.visual.patch_embed.register_forward_hook(self._count)

    def _count(self, module, args, output) -> None:
        self.patches += args[0].shape[0]

    def take(self) -> int:
        patches, self.patches = self.patches, 0
        return patches

    def remove(self) -> None:
        self._handle.remove()


@pytest.fixture
def sharing_backend(tiny_checkpoint: Path, request):
    """A backend of its own: what it has encoded before a test is part of what the test checks. Indirect
    parametrization gives further TransformersConfig settings."""
    backend = _backend(tiny_checkpoint, generation=GenerationConfig(max_new_tokens=16, min_new_tokens=16),
                       **getattr(request, "param", {}))
    counter = _PatchCounter(backend)
    yield backend, counter
    counter.remove()
    backend.close()


def test_questions_about_one_frame_in_a_batch_encode_it_once(sharing_backend, monkeypatch):
    backend, counter = sharing_backend
    frame, other = _request(640, 480, seed=11).image, _request(640, 480, seed=12).image
    requests = [
        _request(640, 480, seed=11),
        InferenceRequest(image=frame.copy(), prompt="Image size: 640 x 480\n\nIs the cup on the table?", question="q"),
        InferenceRequest(image=other, prompt="Image size: 640 x 480\n\nHow many cups are there?", question="q"),
    ]
    patches_per_frame = 54 * 4   # 54 image tokens, each merged from 2x2 patches
    # Before: every image told apart from every other, as if sharing did not exist
    from spatialthinker_ros.core.backends.transformers import generation

    unique = iter(range(10**6))
    monkeypatch.setattr(generation, "image_key", lambda image: str(next(unique)).encode())
    separate = backend.generate(requests)
    assert counter.take() == 3 * patches_per_frame
    monkeypatch.undo()
    backend.forget()

    shared = backend.generate(requests)

    assert counter.take() == 2 * patches_per_frame   # the frame and its copy share one encoding
    assert [r.text for r in shared] == [r.text for r in separate]
    assert [r.prompt_tokens for r in shared] == [r.prompt_tokens for r in separate]


# prompt KV reuse off (as with compile=True, or transformers < 5.23): the tower's cache still serves
@pytest.mark.parametrize("sharing_backend", [{"reuse_prompts": False}], indirect=True)
def test_a_follow_up_question_about_a_recent_frame_reuses_its_encoding(sharing_backend):
    backend, counter = sharing_backend
    assert backend.cache_stats()["prompts"] is None
    request = _request(640, 480, seed=21)
    [first] = backend.generate([request])
    assert counter.take() == 54 * 4

    [again] = backend.generate([_request(640, 480, seed=21)])     # equal pixels, another array
    assert counter.take() == 0
    assert again.text == first.text

    backend.generate([_request(320, 240, seed=seed) for seed in range(30, 34)])   # four newer frames
    counter.take()
    backend.generate([_request(640, 480, seed=21)])
    assert counter.take() == 54 * 4      # only the last four frames are kept


class _FirstScores(LogitsProcessor):
    """Keeps the scores of each generate call's first step: the model's output on the prompt itself."""

    def __init__(self):
        self.calls: list[torch.Tensor] = []
        self._length = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] != self._length:   # a new call starts (each step adds one column)
            self.calls.append(scores.clone())
        self._length = input_ids.shape[1] + 1
        return scores


def test_a_follow_up_question_prefills_only_the_part_of_its_prompt_that_differs(sharing_backend):
    backend, counter = sharing_backend
    first_scores = _FirstScores()
    backend.set_logits_processors(lambda: [first_scores])
    first = _request(640, 480, seed=41)
    follow_up = InferenceRequest(image=first.image.copy(), question="q",
                                 prompt=first.prompt.replace("the cup relative to the plate", "the plate"))
    backend.generate([first])
    backend.generate([_request(672, 224, seed=42)])   # another image shape in between: another rope offset
    counter.take()
    reused = backend.prompts.stats().hits

    [continued] = backend.generate([follow_up])

    shared = backend.prompts.stats().hits - reused
    assert counter.take() == 0                          # the image is in the kept KV: the tower does not run
    # Before: the same question with nothing kept, the whole prompt prefilled
    backend.forget()
    [whole] = backend.generate([follow_up])
    assert whole.prompt_tokens - 12 <= shared < whole.prompt_tokens   # all but "plate?" and the assistant turn
    # The model saw the same prompt at the same positions: the same scores (misplaced tokens move them by ~1e-3)
    continued_scores, whole_scores = first_scores.calls[-2], first_scores.calls[-1]
    finite = torch.isfinite(whole_scores)
    assert torch.equal(finite, torch.isfinite(continued_scores))
    assert torch.allclose(continued_scores[finite], whole_scores[finite], rtol=0, atol=1e-5)
    assert continued.text == whole.text and continued.prompt_tokens == whole.prompt_tokens


def test_scene_only_row_stops_right_after_the_scene_while_full_row_goes_on(forced_backend: TransformersBackend):
    tokenizer = forced_backend.processor.tokenizer
    forced_ids = tokenizer.encode(FORCED, add_special_tokens=False)
    scene_tokens = next(n for n in range(1, len(forced_ids)) if "</scene>" in tokenizer.decode(forced_ids[:n]))
    forcing = _Forcing(forced_backend)
    forced_backend.set_logits_processors(forcing)

    scene, full = forced_backend.generate([_request(640, 480, scene_only=True), _request(320, 240)])

    assert forcing.calls == 1   # one model.generate for both rows
    assert scene.text == SCENE_PART
    assert scene.completion_tokens == scene_tokens == 19
    assert full.text == FORCED
    assert full.completion_tokens == len(forced_ids) + 1   # the answer and its <|im_end|>


def test_streaming_sends_growing_text_and_ends_with_the_result(forced_backend: TransformersBackend):
    seen: list[tuple[str, int]] = []
    quiet, streamed = forced_backend.generate(
        [_request(640, 480), _request(640, 480, on_text=lambda text, tokens: seen.append((text, tokens)))]
    )
    assert streamed.text == quiet.text == FORCED
    assert len(seen) >= 4
    assert seen[-1] == (streamed.text, streamed.completion_tokens)
    for (text, tokens), (later_text, later_tokens) in zip(seen, seen[1:]):
        assert later_text.startswith(text) and later_tokens >= tokens
    assert any(text.endswith("</scene>") for text, _ in seen[:-1])   # sent as the tag closed, not only at the end


def test_scene_only_streaming_ends_at_the_scene(forced_backend: TransformersBackend):
    seen: list[str] = []
    [result] = forced_backend.generate([_request(640, 480, scene_only=True, on_text=lambda t, n: seen.append(t))])
    assert result.text == SCENE_PART
    assert seen[-1] == SCENE_PART
    assert all("<think>" not in text for text in seen)


def test_a_failing_stream_consumer_does_not_cost_the_answer(forced_backend: TransformersBackend):
    calls = []

    def broken(text: str, tokens: int) -> None:
        calls.append(text)
        raise RuntimeError("consumer bug")

    [result] = forced_backend.generate([_request(640, 480, on_text=broken)])
    assert result.text == FORCED
    assert len(calls) == 1


def test_static_cache_option_gives_the_same_answer(backend: TransformersBackend, tiny_checkpoint: Path):
    compiled = _backend(
        tiny_checkpoint, compile=True, generation=GenerationConfig(max_new_tokens=16, min_new_tokens=16)
    )
    try:
        request = _request(640, 480, seed=5)
        assert compiled.generate([request])[0].text == backend.generate([request])[0].text
    finally:
        compiled.close()


@pytest.mark.parametrize(
    ("error", "kind", "phrase"),
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "OUT_OF_MEMORY", "2.00 GiB"),
        (RuntimeError("CUDA error: out of memory"), "OUT_OF_MEMORY", "out of memory"),
        (RuntimeError("shape mismatch in rotary embedding"), "FAILED", "shape mismatch"),
    ],
)
def test_generate_errors_become_one_backend_error_per_request(backend, error, kind, phrase):
    def fail(input_ids, scores):   # raised inside model.generate, on its first step
        raise error

    backend.set_logits_processors(lambda: [fail])
    try:
        results = backend.generate([_request(64, 64), _request(64, 64, scene_only=True)])
    finally:
        backend.set_logits_processors(None)
    assert len(results) == 2
    for result in results:
        assert isinstance(result, BackendError)
        assert result.kind is BackendErrorKind[kind]
        assert phrase in str(result)


def test_missing_model_directory_is_unavailable(tmp_path: Path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(BackendError) as raised:
        _backend(missing)
    assert raised.value.kind is BackendErrorKind.UNAVAILABLE
    assert str(missing) in str(raised.value)


def test_a_checkpoint_of_another_architecture_is_unavailable(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(BackendError) as raised:
        _backend(tmp_path)
    assert raised.value.kind is BackendErrorKind.UNAVAILABLE
    assert "not a Qwen2.5-VL checkpoint" in str(raised.value) and "'bert'" in str(raised.value)


def test_an_unreachable_hub_model_is_unavailable_and_named():
    with pytest.raises(BackendError) as raised:
        TransformersBackend(TransformersConfig(model="OX-PIXL/no-such-model-here", device="cpu", local_files_only=True))
    assert raised.value.kind is BackendErrorKind.UNAVAILABLE
    assert "OX-PIXL/no-such-model-here" in str(raised.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_unavailable(tiny_checkpoint: Path):
    with pytest.raises(BackendError) as raised:
        _backend(tiny_checkpoint, device="cuda")
    assert raised.value.kind is BackendErrorKind.UNAVAILABLE
    assert "CUDA is not available" in str(raised.value)


def test_quantization_without_its_requirements_is_unavailable(tiny_checkpoint: Path):
    with pytest.raises(BackendError) as raised:
        _backend(tiny_checkpoint, quantization="4bit")
    assert raised.value.kind is BackendErrorKind.UNAVAILABLE
    assert "quantization '4bit' needs" in str(raised.value)


def test_closed_backend_answers_unavailable(tiny_checkpoint: Path):
    # a short answer: a random model's up to 2048 tokens on a loaded CPU say nothing about closing
    backend = _backend(tiny_checkpoint, generation=GenerationConfig(max_new_tokens=16))
    backend.generate([_request(64, 64)])
    model = weakref.ref(backend.model)
    backend.close()
    assert model() is None, "after close nothing holds the model, so its memory (GPU included) can be freed"
    backend.close()
    [result] = backend.generate([_request(64, 64)])
    assert isinstance(result, BackendError) and result.kind is BackendErrorKind.UNAVAILABLE


def test_more_requests_than_the_batch_size_is_a_caller_bug(backend: TransformersBackend):
    with pytest.raises(ValueError, match="exceed max_batch_size 8"):
        backend.generate([_request(64, 64)] * 9)
    assert backend.generate([]) == []


@pytest.mark.parametrize(
    "settings",
    [
        {"device": "gpu"},
        {"device": "cuda:x"},
        {"dtype": "fp8"},
        {"quantization": "2bit"},
        {"max_pixels": 100},
        {"min_pixels": 1_000_000, "max_pixels": 500_000},
        {"max_batch_size": 0},
        {"model": ""},
        {"attn_implementation": ""},
    ],
)
def test_invalid_settings_are_rejected(settings):
    with pytest.raises(ValueError):
        TransformersConfig(**settings)


# ------------------------------------------------------------------------------------------ option probabilities
OPTIONS = ("left of", "right of", "behind", "in front of")
# The card's example answer, as the real prompt quotes it
CARD_EXAMPLE = "The final answer MUST BE put within <answer> </answer> tags, e.g., <answer> (A) cat </answer>."


def _options_request(width: int, height: int, seed: int = 0, question: str = "Where is the cup?",
                     options: tuple[str, ...] = OPTIONS) -> InferenceRequest:
    request = _request(width, height, seed)
    return InferenceRequest(image=request.image, prompt=f"{request.prompt} {CARD_EXAMPLE} {question}",
                            question=question, asked=Question(question, options))


def _forcing(backend: TransformersBackend, answers: list[Union[str, list[int]]]) -> None:
    """Makes row i of every batch write answers[i] (a text as the tokenizer writes it, or token ids as given) and end
    (set_logits_processors: after the backend's letter probe, which reads the model's own scores; not in the
    probe's extra steps)."""
    tokenizer = backend.processor.tokenizer
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    sequences = [(tokenizer.encode(a, add_special_tokens=False) if isinstance(a, str) else a) + [eos] for a in answers]

    class Force(LogitsProcessor):
        def __init__(self):
            self._start = None

        def __call__(self, input_ids, scores):
            self._start = self._start or input_ids.shape[1]
            forced = torch.full_like(scores, -math.inf)
            for row in range(scores.shape[0]):
                sequence = sequences[row]
                forced[row, sequence[min(input_ids.shape[1] - self._start, len(sequence) - 1)]] = 0.0
            return forced

    backend.set_logits_processors(lambda: [Force()])


def _direct_letter_probabilities(backend: TransformersBackend, request: InferenceRequest, written: str,
                                 count: int = 4, before: tuple[int, ...] = ()) -> list[float]:
    """The first `count` option letters' probabilities after `written` (the answer's text up to its letter, after the
    tokens `before`), each letter written as the tokenizer writes `written` + letter: one plain forward pass over the
    prompt and those tokens per letter, no cache, the product of the probabilities of the letter's tokens from where
    the letters' tokens part, renormalised."""
    tokenizer = backend.processor.tokenizer
    inputs = backend.prepare_inputs([request])
    prompt = inputs["input_ids"].shape[1]
    encoded = [list(before) + tokenizer.encode(written + option_letter(i), add_special_tokens=False)
               for i in range(count)]
    parted = next(i for i in range(len(encoded[0])) if len({tuple(tokens[:i + 1]) for tokens in encoded}) > 1)
    weights = []
    for tokens in encoded:
        ids = torch.cat([inputs["input_ids"], torch.tensor([tokens])], 1)
        # text after the prompt: Qwen2.5-VL then places every token by its 3D rope positions, as generate does
        types = torch.cat([inputs["mm_token_type_ids"], torch.zeros((1, len(tokens)), dtype=torch.int)], 1)
        with torch.inference_mode():
            logits = backend.model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types,
                                   pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]).logits
        log_probabilities = torch.log_softmax(logits[0].double(), -1)
        weights.append(sum(float(log_probabilities[prompt + i - 1, tokens[i]]) for i in range(parted, len(tokens))))
    masses = [math.exp(w - max(weights)) for w in weights]
    return [m / sum(masses) for m in masses]


@pytest.fixture(scope="module")
def letters_backend(tiny_checkpoint: Path):
    backend = _backend(tiny_checkpoint, generation=GenerationConfig(max_new_tokens=48))
    yield backend
    backend.close()


@pytest.fixture
def letters(letters_backend):
    """letters_backend with nothing kept from an earlier test and no forced answer left over."""
    letters_backend.forget()
    yield letters_backend
    letters_backend.set_logits_processors(None)


LETTER_ANSWER = "<observe> a cup </observe> <answer> (B) right of </answer>"


SPLIT_TAG = ("<", "ans", "wer")   # "<answer" as the tokenizer does not write it ("<", "answer")

# Each way an answer writes its letter, its text up to the letter (after SPLIT_TAG's tokens where it has them).
# Qwen writes them (pre-tokenizer, then BPE):
ANSWER_FORMS = {
    "card": (LETTER_ANSWER, "<observe> a cup </observe> <answer> ("),         # "<" "answer" ">" " (" "B" ")"
    "parenthesis": ("<answer>(B)</answer>", "<answer>("),                     # ">(" "B"
    "bare": ("<answer>B</answer>", "<answer>"),                               # ">B": the letter right after "<answer"
    "newline": ("<answer>\n(B) right of</answer>", "<answer>\n("),            # ">\n" "(B"
    "letter-dot": ("<answer> B. right of </answer>", "<answer> "),             # ">" " B" "."
    "after-think": ("<think> x </think> <answer> (B) right of </answer>",
                    "<think> x </think> <answer> ("),                          # " <" "answer"
    "split-tag": (SPLIT_TAG + ("> (B) right of </answer>",), "> ("),             # "<" "ans" "wer" ">" " (" "B"
}


@pytest.mark.parametrize("form", ANSWER_FORMS)
def test_each_answer_form_gives_the_probabilities_of_a_direct_forward_pass(letters, form):
    answer, written = ANSWER_FORMS[form]
    tokenizer = letters.processor.tokenizer
    tag: tuple[int, ...] = ()
    if not isinstance(answer, str):   # pieces, each written as the tokenizer writes it alone
        answer = [token for piece in answer for token in tokenizer.encode(piece, add_special_tokens=False)]
        tag = tuple(answer[:len(SPLIT_TAG)])
    request = _options_request(224, 224, seed=11)
    follow_up = _options_request(224, 224, seed=11, question="Where is the plate?")
    longer = _options_request(320, 240, seed=12, question="Which of the objects on the table is nearest the robot?")
    before = letters.letter_stats()

    _forcing(letters, [answer])
    [alone] = letters.generate([request])            # the whole prompt prefilled
    hits = letters.prompts.stats().hits
    [continued] = letters.generate([follow_up])     # continued from the first question's KV
    assert letters.prompts.stats().hits > hits
    _forcing(letters, [LETTER_ANSWER, answer])
    beside, batched = letters.generate([longer, request])   # left-padded beside a longer prompt

    text = answer if isinstance(answer, str) else tokenizer.decode(answer)
    assert (alone.text, continued.text, batched.text) == (text, text, text)
    assert (alone.option_probabilities_note, continued.option_probabilities_note, batched.option_probabilities_note
            ) == ("", "", "")
    expected = _direct_letter_probabilities(letters, request, written, before=tag)
    assert alone.option_probabilities == pytest.approx(expected, abs=1e-4)
    assert batched.option_probabilities == pytest.approx(expected, abs=1e-4)
    assert continued.option_probabilities == pytest.approx(
        _direct_letter_probabilities(letters, follow_up, written, before=tag), abs=1e-4)
    assert beside.option_probabilities == pytest.approx(
        _direct_letter_probabilities(letters, longer, LETTER_ANSWER[:LETTER_ANSWER.index("B")]), abs=1e-4)
    # every offered letter is one token where these answers write theirs: read from generate's own steps
    after = letters.letter_stats()
    assert (after.probed - before.probed, after.extra_steps - before.extra_steps) == (4, 0)


def test_a_letter_written_in_two_tokens_where_the_answer_wrote_its_letter_is_read_through_both(letters):
    tokenizer = letters.processor.tokenizer
    # Qwen writes "<answer>B" with ">B" but "<answer>Q" with ">", "Q": Q's probability there is P(">") P("Q" | ">")
    assert [tokenizer.decode([t]) for t in tokenizer.encode("<answer>Q", add_special_tokens=False)][-2:] == [">", "Q"]
    request = _options_request(224, 224, seed=13, options=tuple(f"object {i}" for i in range(17)))   # A..Q
    _forcing(letters, ["<answer>B</answer>"])
    before = letters.letter_stats()

    [result] = letters.generate([request])

    assert letters.letter_stats().extra_steps - before.extra_steps == 1   # one step after ">"
    assert result.option_probabilities_note == ""
    assert result.option_probabilities == pytest.approx(
        _direct_letter_probabilities(letters, request, "<answer>", count=17), abs=1e-4)


def test_a_letter_the_answer_wrote_after_a_lone_tag_close_is_read_where_the_tag_closed(letters):
    """"<answer>Q" is "<" "answer" ">" "Q": after that lone ">", a B would be a tokenization the model never writes
    (it writes ">B"), so the letters are compared where ">" was written: P(">B") against P(">") P("Q" | ">")."""
    request = _options_request(224, 224, seed=13, options=tuple(f"object {i}" for i in range(17)))   # A..Q
    _forcing(letters, ["<answer>Q</answer>"])
    before = letters.letter_stats()

    [result] = letters.generate([request])

    assert letters.letter_stats().extra_steps - before.extra_steps == 1   # the step after ">", log-probabilities
    assert result.option_probabilities_note == ""
    assert result.option_probabilities == pytest.approx(
        _direct_letter_probabilities(letters, request, "<answer>", count=17), abs=1e-4)


@pytest.mark.parametrize("answer, written, steps", [
    ("<answer> cat </answer>", "<answer> (", 1),     # after ">" Qwen writes " (" (one token, 320), then the letter
    ("<answer>cat</answer>", "<answer> (", 1),
    ("<answer>", "<answer> (", 1),
    ("<answer>\ncat</answer>", "<answer>\n(", 0),    # after ">\n" it writes "(B" (one token): read at that step
])
def test_without_a_letter_the_card_form_is_read_as_the_tokenizer_writes_it_after_what_was_written(
        letters, answer, written, steps):
    assert letters.processor.tokenizer.encode(" (", add_special_tokens=False) == [320]
    request = _options_request(640, 480, seed=7)
    other = _options_request(320, 240, seed=8)
    _forcing(letters, [answer, LETTER_ANSWER])
    before = letters.letter_stats()

    result, beside = letters.generate([request, other])   # in a batch: the row's own slice of the cache

    # the extra step is for that row only (the other wrote its letter)
    after = letters.letter_stats()
    assert (after.probed - before.probed, after.extra_steps - before.extra_steps) == (2, steps)
    assert result.option_probabilities == pytest.approx(
        _direct_letter_probabilities(letters, request, written), abs=1e-4)
    assert result.option_probabilities_note == (f"read as if the answer went on in the card's form "
                                                f"(\"{written}A)\"): the model wrote no option letter after <answer>")
    assert beside.option_probabilities_note == ""
    assert beside.option_probabilities == pytest.approx(
        _direct_letter_probabilities(letters, other, LETTER_ANSWER[:LETTER_ANSWER.index("B")]), abs=1e-4)


def test_the_letter_is_read_at_the_answer_the_parser_takes_not_at_one_quoted_in_think(letters):
    answer = ("<observe> a cup </observe> <think> The card answers like <answer> (A) cat </answer>, and the cup "
              "is right of the plate. </think> <answer> (B) right of </answer>")
    request = _options_request(224, 224, seed=14)
    _forcing(letters, [answer])

    [result] = letters.generate([request])

    assert parse_response(result.text, OPTIONS).choice == "B"
    quoted = _direct_letter_probabilities(letters, request, answer[:answer.index("(A") + 1])
    answered = _direct_letter_probabilities(letters, request, answer[:answer.index("(B") + 1])
    assert result.option_probabilities == pytest.approx(answered, abs=1e-4)
    assert result.option_probabilities != pytest.approx(quoted, abs=1e-4)


def _with_generation_config(checkpoint: Path, directory: Path, **settings) -> Path:
    """The checkpoint (its files linked) with `settings` added to its generation_config.json."""
    directory.mkdir()
    for path in checkpoint.iterdir():
        if path.name != "generation_config.json":
            (directory / path.name).symlink_to(path)
    config = json.loads((checkpoint / "generation_config.json").read_text()) | settings
    (directory / "generation_config.json").write_text(json.dumps(config))
    return directory


def test_a_checkpoints_repetition_penalty_does_not_change_the_probabilities(letters, tiny_checkpoint, tmp_path):
    # Qwen2.5-VL-7B-Instruct ships repetition_penalty 1.05; with no_repeat_ngram_size 3, the prompt's example
    # "<answer> (A" would also rule out "A" after "<answer> ("
    penalised = _backend(_with_generation_config(tiny_checkpoint, tmp_path / "penalised", repetition_penalty=1.05,
                                                 no_repeat_ngram_size=3),
                         generation=GenerationConfig(max_new_tokens=48))
    request = _options_request(224, 224, seed=15)
    _forcing(letters, [LETTER_ANSWER])
    _forcing(penalised, [LETTER_ANSWER])
    try:
        [plain] = letters.generate([request])
        [result] = penalised.generate([request])
    finally:
        penalised.close()
    assert result.option_probabilities == pytest.approx(plain.option_probabilities, abs=1e-9)
    assert result.option_probabilities == pytest.approx(
        _direct_letter_probabilities(letters, request, LETTER_ANSWER[:LETTER_ANSWER.index("B")]), abs=1e-4)


def test_a_checkpoint_that_asks_for_beam_search_is_refused_at_load(tiny_checkpoint, tmp_path):
    with pytest.raises(BackendError) as raised:
        _backend(_with_generation_config(tiny_checkpoint, tmp_path / "beams", num_beams=4))
    assert raised.value.kind is BackendErrorKind.UNAVAILABLE
    assert "num_beams 4" in str(raised.value) and "one sequence per question" in str(raised.value)


def test_free_form_and_scene_only_requests_are_not_probed(letters):
    _forcing(letters, [LETTER_ANSWER, LETTER_ANSWER])
    scene = _options_request(640, 480)
    scene.scene_only = True
    before = letters.letter_stats()
    free, scene_result = letters.generate([_request(640, 480), scene])
    assert letters.letter_stats() == before
    assert (free.option_probabilities, free.option_probabilities_note) == ((), "")
    assert (scene_result.option_probabilities, scene_result.option_probabilities_note) == ((), "")
