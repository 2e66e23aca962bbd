"""Latency of our TransformersBackend against the SpatialThinker-7B model card's own usage code, same process,
same model, same inputs; decode speed against the memory-bandwidth roofline; batching; scene-only; memory;
what reading option probabilities costs an answer.

    python -m bench.gpu_latency                   # GPU: the 7B shape, random weights, bf16, cuda (from the checkout)
    python -m bench.gpu_latency --compile         # ... plus the static-cache/compile option
    python -m bench.gpu_latency --checkpoint DIR  # a real checkpoint (e.g. SpatialThinker-7B) instead
    python -m bench.gpu_latency --tiny            # CPU plumbing check: tiny shape, same code paths

ROS-free: imports torch, transformers and the package's ROS-free core only, so it runs from a source checkout
on a GPU machine without ROS. Nothing is downloaded.

The model. Without --checkpoint, a Qwen2_5_VLForConditionalGeneration of the real Qwen2.5-VL-7B shape with
random weights is built directly on the device, with a processor whose tokenizer has Qwen's special tokens at the
real ids (bench/_speedmodel.py). Speed does not depend on weight values when the output length is forced
(min_new_tokens == max_new_tokens), so it times like SpatialThinker-7B. Both paths share that one model object
(loading is not timed: neither side loads anything). Our backend is given it (TransformersBackend's `loaded`);
everything after loading is the product's code, reached through its public API only.

The model card's code, replicated line by line (SpatialThinker-7B README, "Usage"): torch_dtype="auto" (bf16, the
checkpoint's dtype), device_map="auto", default attention (sdpa), apply_chat_template, processor(text=[text],
images=[image]) with the checkpoint's default pixel limits, model.generate with the checkpoint's generation
config (SpatialThinker-7B's generation_config.json sets only eos/pad: greedy), batch_decode. The only change:
max_new_tokens=1024 becomes the forced length on both sides.

--tiny builds the tiny checkpoint's shape (tiny-model.md) with the same real vocabulary and token ids and runs
everything on the CPU in fp32. Its figures are plumbing checks, not speed claims.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image

from bench._common import machine, table, write_results
from bench._forced import forced, padded_to, without_letter
from bench._speedmodel import CARD_EXAMPLE_RESPONSE, SHORT_RESPONSE, build_speed_model, decode_weight_bytes
from spatialthinker_ros.core.backends.base import GenerationConfig
from spatialthinker_ros.core.backends.transformers import TransformersBackend, TransformersConfig
from spatialthinker_ros.core.parsing import scene_text_complete
from spatialthinker_ros.core.pipeline import PipelineConfig, finish_result, prepare_request
from spatialthinker_ros.core.types import BackendError

CARD_ATTENTION = "sdpa"   # transformers' default: the model card's code names none
QUESTION = "Where is the cat relative to the couch?"
OPTIONS = ["on top of", "in front of", "behind", "beside"]
CARD_QUESTION = "Where is the cat relative to the couch? (A) on top of (B) in front of (C) behind (D) beside"
BATCH_QUESTIONS = [
    "Where is the cat relative to the couch?", "Is the table left or right of the cat?",
    "Which object is closest to the camera?", "Is the couch behind the table?", "Where is the lamp relative to the cat?",
    "Which object is larger, the couch or the table?", "Is the cat on the floor?", "What is in front of the couch?",
]
# Nominal memory bandwidth (bytes/s) by torch.cuda.get_device_name() substring, most specific first.
NOMINAL_BANDWIDTH = (
    ("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L40S", 0.864e12),
    ("L4", 0.3e12), ("A10", 0.6e12), ("RTX 4090", 1.008e12),
)


# ----------------------------------------------------------------------------------------- the model card's code
def card_answer(model, processor, image: Image.Image, question: str, new_tokens: int):
    """The model card's usage snippet, line for line, with the output length forced."""
    width, height = image.size
    template = f"""You FIRST observe the image in <observe> </observe> tags, then visualise the relevant scene graph in <scene> </scene> tags, followed by thinking about the reasoning process as an internal monologue within <think> </think> tags and then provide the final answer. The final answer MUST BE put within <answer> </answer> tags, and only return the final choice including the correct option and answer within the answer tags, e.g., <answer> (A) cat </answer>.

Image size: {width} x {height}"""  # noqa: E501
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "text", "text": template + "\n\n" + question},
            ],
        }
    ]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt").to(model.device)
    generated_ids = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    output = processor.batch_decode(generated_ids, skip_special_tokens=True)[0]
    prompt_tokens = inputs["input_ids"].shape[1]
    return output, generated_ids.shape[1] - prompt_tokens, prompt_tokens, template + "\n\n" + question


# ----------------------------------------------------------------------------------------------- our product
def ours_answer(backend: TransformersBackend, rgb: np.ndarray, question: str = QUESTION, options=OPTIONS,
                scene_only: bool = False, on_text=None, keep: bool = False):
    """One request. The backend forgets what it kept of earlier frames first (unless `keep`): their image encodings
    and prompt KV. The card's code starts from nothing for every question, as a new camera frame would."""
    if not keep:
        backend.forget()
    request = prepare_request(rgb, question, options, PipelineConfig(), scene_only=scene_only, on_text=on_text)
    [result] = backend.generate([request])
    if isinstance(result, BackendError):
        raise RuntimeError(f"backend error: {result}")
    finish_result(request, result, options, camera_size=(rgb.shape[1], rgb.shape[0]))
    return result, request


def ours_batch(backend: TransformersBackend, frames: list[np.ndarray]):
    """One question per frame, all in one generate; nothing encoded before counts."""
    backend.forget()
    requests = [prepare_request(rgb, q, [], PipelineConfig()) for rgb, q in zip(frames, BATCH_QUESTIONS * 8)]
    results = backend.generate(requests)
    for rgb, request, result in zip(frames, requests, results):
        if isinstance(result, BackendError):
            raise RuntimeError(f"backend error: {result}")
        finish_result(request, result, [], camera_size=(rgb.shape[1], rgb.shape[0]))
    return results


def images_encoded(backend: TransformersBackend) -> int:
    stats = backend.cache_stats()["image_encodings"]
    return stats.misses if stats else 0


def prompt_tokens_reused(backend: TransformersBackend) -> int:
    stats = backend.cache_stats()["prompts"]   # None where prompt KV is not reused (compile, transformers < 5.23)
    return stats.hits if stats else 0


@contextmanager
def generation(backend: TransformersBackend, base: GenerationConfig, **changes: Any) -> Iterator[None]:
    """The backend decodes with `base` changed (length, ...) for one phase, then with `base` again."""
    backend.set_generation(dataclasses.replace(base, **changes))
    try:
        yield
    finally:
        backend.set_generation(base)


# ---------------------------------------------------------------------------------------------------- timing
class Timer:
    """The one timing loop: steps run in turn (interleaved, so drift hits them alike), `warmup` rounds unrecorded,
    then `repeats` recorded; on cuda each step is timed between device synchronisations."""

    def __init__(self, device: str, warmup: int, repeats: int):
        self.cuda = device.startswith("cuda")
        self.warmup, self.repeats = warmup, repeats

    def once(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        """(seconds, value) of one call."""
        if self.cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        value = fn()
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started, value

    def rounds(self, steps: dict[str, Callable[[], Any]], repeats: int = 0) -> tuple[dict[str, list[float]], dict[str, Any]]:
        """Each step's recorded seconds, and each step's last value."""
        seconds: dict[str, list[float]] = {name: [] for name in steps}
        values: dict[str, Any] = {}
        for index in range(self.warmup + (repeats or self.repeats)):
            for name, fn in steps.items():
                elapsed, values[name] = self.once(fn)
                if index >= self.warmup:
                    seconds[name].append(elapsed)
        return seconds, values


def median(values):
    return statistics.median(values) if values else float("nan")


def frames_one_pixel_apart(rgb: np.ndarray, n: int) -> list[np.ndarray]:
    """n frames that cost what `rgb` costs but cannot share an encoding: n cameras, or one camera over time."""
    if not 1 <= n <= 255:
        raise ValueError(f"1..255 frames, not {n}")
    frames = [rgb.copy() for _ in range(n)]
    for index, frame in enumerate(frames):
        frame[0, 0, 0] ^= index + 1
    return frames


def camera_frame(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), ((x // 48 + y // 48) % 2) * 200 + 20],
                   axis=-1)
    return rgb.astype(np.uint8)


def peak_memory(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


class Attention:
    """The attention implementation each model runs, as built or as switched here (transformers offers no public
    getter): the one model shared by both paths is switched in place only when the path about to run wants another."""

    def __init__(self) -> None:
        self._current: dict[int, str] = {}

    def built(self, model: Any, implementation: str) -> None:
        self._current[id(model)] = implementation

    def use(self, model: Any, implementation: str) -> None:
        current = self._current.get(id(model))
        if current == implementation:
            return
        if not hasattr(model, "set_attn_implementation"):
            raise RuntimeError(f"this transformers cannot switch attention {current} -> {implementation} in place; "
                               "rerun with --attn sdpa")
        model.set_attn_implementation(implementation)
        self._current[id(model)] = implementation


def bandwidth(device: str) -> dict:
    """Nominal (by device name) and measured (device-to-device copy of 1 GiB, read + write) memory bandwidth."""
    if not device.startswith("cuda"):
        return {"name": "cpu", "nominal_bytes_per_s": None, "measured_bytes_per_s": None}
    name = torch.cuda.get_device_name(0)
    nominal = next((bw for key, bw in NOMINAL_BANDWIDTH if key in name), None)
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    measured = 2 * x.numel() * 10 / (time.perf_counter() - started)
    del x, y
    torch.cuda.empty_cache()
    return {"name": name, "nominal_bytes_per_s": nominal, "measured_bytes_per_s": measured}


# ------------------------------------------------------------------------------------------------------- phases
@dataclass
class Bench:
    """What every phase uses: both paths' model objects, our backend, settings."""

    args: argparse.Namespace
    device: str
    timer: Timer
    card_model: Any
    card_processor: Any
    backend: TransformersBackend
    generation: GenerationConfig
    attention: Attention
    card_attention: str = CARD_ATTENTION

    @property
    def ours_model(self) -> Any:
        return self.backend.model

    def run_card(self, image: Image.Image, new_tokens: int):
        if self.ours_model is self.card_model:
            self.attention.use(self.card_model, self.card_attention)
        return card_answer(self.card_model, self.card_processor, image, CARD_QUESTION, new_tokens)

    def run_ours(self, rgb: np.ndarray, **kwargs):
        if self.ours_model is self.card_model:
            self.attention.use(self.card_model, self.backend.attn_implementation)
        return ours_answer(self.backend, rgb, **kwargs)

    def run_ours_batch(self, frames: list[np.ndarray]):
        self.attention.use(self.ours_model, self.backend.attn_implementation)
        return ours_batch(self.backend, frames)

    def frame(self) -> np.ndarray:
        return camera_frame(*(int(v) for v in self.args.size.split("x")))


def load(args: argparse.Namespace, device: str, timer: Timer) -> Bench:
    """The model: one object shared by both paths (or loaded by each from a real checkpoint)."""
    generation = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    config = TransformersConfig(model=args.checkpoint or "speed-model", device=device, attn_implementation=args.attn,
                                generation=generation, local_files_only=True)
    attention = Attention()
    if args.checkpoint:
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        card_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.checkpoint, torch_dtype="auto",
                                                                        device_map="auto")
        card_processor = AutoProcessor.from_pretrained(args.checkpoint)
        backend = TransformersBackend(config)
        attention.built(backend.model, backend.attn_implementation)   # the card's model is never switched
    else:
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        card_model, card_processor = build_speed_model("tiny" if args.tiny else "7b", device, dtype,
                                                       attn_implementation=CARD_ATTENTION)
        attention.built(card_model, CARD_ATTENTION)
        backend = TransformersBackend(config, loaded=(card_model, card_processor))
        if backend.dtype != str(card_model.dtype).removeprefix("torch."):
            raise RuntimeError(f"backend wants {backend.dtype}, the speed model is {card_model.dtype}")
        attention.use(card_model, backend.attn_implementation)
    return Bench(args, device, timer, card_model, card_processor, backend, generation, attention)


def phase_sizes(b: Bench, size: str) -> dict:
    """End to end, card vs ours, interleaved; then the same with one output token (prefill); preprocessing."""
    rgb = camera_frame(*(int(v) for v in size.split("x")))
    image = Image.fromarray(rgb)
    n = b.args.new_tokens
    reset_peak(b.device)
    runs, values = b.timer.rounds({"card": lambda: b.run_card(image, n), "ours": lambda: b.run_ours(rgb)})
    _, card_tokens, card_prompt, card_text = values["card"]
    result, request = values["ours"]
    peak = peak_memory(b.device)
    with generation(b.backend, b.generation, max_new_tokens=1, min_new_tokens=1):
        first, _ = b.timer.rounds({"card": lambda: b.run_card(image, 1), "ours": lambda: b.run_ours(rgb)})
    card_messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                  {"type": "text", "text": card_text}]}]

    def card_preprocess():
        text = b.card_processor.apply_chat_template(card_messages, tokenize=False, add_generation_prompt=True)
        b.card_processor(text=[text], images=[image], return_tensors="pt")

    # the processor call alone (chat template + image resize/normalise + tokenise), as each path makes it (CPU)
    cpu = Timer("cpu", 1, b.args.repeats)
    preprocess, _ = cpu.rounds({"card": card_preprocess, "ours": lambda: b.backend.prepare_inputs([request])})
    card_s, ours_s = median(runs["card"]), median(runs["ours"])
    card_decode = (card_s - median(first["card"])) / (n - 1)
    ours_decode = (ours_s - median(first["ours"])) / (n - 1)
    if card_tokens != n or result.completion_tokens != n:
        log(f"WARNING: forced length not honoured: card {card_tokens}, ours {result.completion_tokens}")
    return {
        "card_s": card_s, "ours_s": ours_s, "card_runs": runs["card"], "ours_runs": runs["ours"],
        "speedup_card_over_ours": card_s / ours_s,
        "card_tokens": card_tokens, "ours_tokens": result.completion_tokens,
        "card_prompt_tokens": card_prompt, "ours_prompt_tokens": result.prompt_tokens,
        "card_tokens_per_s": card_tokens / card_s, "ours_tokens_per_s": result.completion_tokens / ours_s,
        "card_first_token_s": median(first["card"]), "ours_first_token_s": median(first["ours"]),
        "card_decode_ms_per_token": 1000 * card_decode, "ours_decode_ms_per_token": 1000 * ours_decode,
        "same_prompt_text": card_text == request.prompt, "peak_gib": peak,
        "card_preprocess_s": median(preprocess["card"]), "ours_preprocess_s": median(preprocess["ours"]),
    }


def phase_roofline(b: Bench, ours_decode_ms_per_token: float, per_token_bytes: int) -> dict:
    """Decode speed against the memory-bandwidth roofline (nominal and measured bandwidth)."""
    bw = bandwidth(b.device)
    results: dict = {"bandwidth": bw}
    for key in ("nominal", "measured"):
        value = bw[f"{key}_bytes_per_s"]
        if value:
            roofline_ms = 1000 * per_token_bytes / value
            results[f"roofline_ms_per_token_{key}"] = roofline_ms
            results[f"ours_decode_vs_roofline_{key}"] = ours_decode_ms_per_token / roofline_ms
    return results


def phase_vision_tower(b: Bench) -> float:
    """The vision tower alone on one frame (what a kept encoding saves each further question)."""
    rgb = b.frame()
    b.attention.use(b.ours_model, b.backend.attn_implementation)
    inputs = b.backend.prepare_inputs([prepare_request(rgb, QUESTION, OPTIONS, PipelineConfig())]).to(b.ours_model.device)
    visual = getattr(getattr(b.ours_model, "model", b.ours_model), "visual", None) or b.ours_model.visual
    pixels = inputs["pixel_values"].to(next(visual.parameters()).dtype)
    with torch.inference_mode():
        seconds, _ = Timer(b.device, 1, b.args.repeats).rounds(
            {"tower": lambda: visual(pixels, grid_thw=inputs["image_grid_thw"])})
    return median(seconds["tower"])


def phase_batch(b: Bench) -> dict:
    """`--batch` concurrent requests (one batched generate) against one."""
    rgb = b.frame()
    reset_peak(b.device)
    seconds, values = b.timer.rounds({"single": lambda: b.run_ours(rgb),
                                      "batch": lambda: b.run_ours_batch(frames_one_pixel_apart(rgb, b.args.batch))},
                                     repeats=max(1, b.args.repeats // 2))
    batch_tokens = sum(r.completion_tokens for r in values["batch"])
    single, batched = median(seconds["single"]), median(seconds["batch"])
    return {
        "n": b.args.batch, "single_s": single, "batch_s": batched,
        "single_tokens_per_s": b.args.new_tokens / single, "batch_tokens_per_s": batch_tokens / batched,
        "throughput_ratio": (batch_tokens / batched) / (b.args.new_tokens / single),
        "latency_ratio": batched / single, "peak_gib": peak_memory(b.device),
    }


def phase_one_frame(b: Bench) -> dict:
    """Several questions about one frame (its encoding shared) against the same batch about distinct frames; then
    a follow-up's first token with the first question's prompt KV and encoding kept (the product), with only the
    encoding kept (before prompt KV reuse), and for a new frame (nothing kept)."""
    rgb = b.frame()
    one_frame, distinct = [rgb] * b.args.batch, frames_one_pixel_apart(rgb, b.args.batch)

    def encoded_by(frames):
        before = images_encoded(b.backend)
        b.run_ours_batch(frames)
        return images_encoded(b.backend) - before

    seconds, encoded = b.timer.rounds({"shared": lambda: encoded_by(one_frame),
                                       "separate": lambda: encoded_by(distinct)},
                                      repeats=max(1, b.args.repeats // 2))
    follow = dict(question=BATCH_QUESTIONS[1], options=[], keep=True)

    def follow_up():
        before = prompt_tokens_reused(b.backend)
        b.run_ours(rgb, **follow)
        return prompt_tokens_reused(b.backend) - before

    def encoding_only():
        b.backend.forget(images=False)
        b.run_ours(rgb, **follow)

    with generation(b.backend, b.generation, max_new_tokens=1, min_new_tokens=1):
        first, reused = b.timer.rounds({"first": lambda: b.run_ours(rgb),   # the first question about the frame
                                        "follow_up": follow_up, "encoding_only": encoding_only,
                                        "new_frame": lambda: b.run_ours(distinct[1], **follow)})
    follow_up_s, encoding_only_s, new_frame_s = (median(first[k]) for k in ("follow_up", "encoding_only", "new_frame"))
    return {
        "n": b.args.batch, "shared_s": median(seconds["shared"]), "separate_s": median(seconds["separate"]),
        "speedup": median(seconds["separate"]) / median(seconds["shared"]),
        "images_encoded_shared": encoded["shared"], "images_encoded_separate": encoded["separate"],
        "follow_up_first_token_s": follow_up_s, "new_frame_first_token_s": new_frame_s,
        "follow_up_encoding_only_first_token_s": encoding_only_s,
        "follow_up_speedup": new_frame_s / follow_up_s, "prompt_reuse_speedup": encoding_only_s / follow_up_s,
        "follow_up_prompt_tokens_reused": reused["follow_up"],
    }


def phase_scene_only(b: Bench) -> dict:
    """Scene-only against full answers, and the time to the scene (the action's early feedback), on a forced
    answer: the model card's example (or a short one with --short-answer)."""
    rgb = b.frame()
    answer_text = SHORT_RESPONSE if b.args.short_answer else CARD_EXAMPLE_RESPONSE
    tokenizer = b.backend.processor.tokenizer
    script = tokenizer.encode(answer_text, add_special_tokens=False)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    to_scene: list[float] = []

    def full():
        marks: dict = {}
        begun = time.perf_counter()

        def on_text(text: str, tokens: int) -> None:
            if "scene" not in marks and scene_text_complete(text):
                marks["scene"] = time.perf_counter() - begun
        result, _ = b.run_ours(rgb, on_text=on_text)
        to_scene.append(marks.get("scene", float("nan")))
        return result

    with forced(b.backend, script, eos), generation(b.backend, b.generation, max_new_tokens=len(script) + 16,
                                                       min_new_tokens=0):
        seconds, values = b.timer.rounds({"scene": lambda: b.run_ours(rgb, scene_only=True)[0], "full": full})
    scene_result, full_result = values["scene"], values["full"]
    full_s, scene_s = median(seconds["full"]), median(seconds["scene"])
    return {
        "full_tokens": full_result.completion_tokens, "scene_only_tokens": scene_result.completion_tokens,
        "tokens_saved_fraction": 1 - scene_result.completion_tokens / full_result.completion_tokens,
        "full_s": full_s, "scene_only_s": scene_s, "time_saved_ratio": full_s / scene_s,
        "streamed_time_to_scene_s": median(to_scene[b.timer.warmup:]), "streamed_time_to_answer_s": full_s,
        "scene_complete_in_scene_only_text": scene_text_complete(scene_result.text),
        "forced_text_came_back": full_result.text == answer_text,
    }


def phase_option_probabilities(b: Bench) -> dict:
    """What reading option probabilities costs an answer (issue 20: under 2 % of its time), on one forced answer
    (the model card's example, or a short one with --short-answer), interleaved: with options (the letter probe
    follows every token and reads the letter), free-form (no probe), and with options but no letter after <answer>
    (the same length; the probe's extra step from the cache runs). Ratios are medians of each round's ratios."""
    rgb = b.frame()
    answer_text = SHORT_RESPONSE if b.args.short_answer else CARD_EXAMPLE_RESPONSE
    tokenizer = b.backend.processor.tokenizer
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    letter = tokenizer.encode(answer_text, add_special_tokens=False)
    no_letter = padded_to(tokenizer, without_letter(answer_text), len(letter))
    extra_steps: dict[str, list[int]] = {"letter": [], "free_form": [], "no_letter": []}

    def answer(kind: str, script: list[int], options: list[str]):
        before = b.backend.letter_stats().extra_steps
        with forced(b.backend, script, eos):
            result, _ = b.run_ours(rgb, options=options)
        extra_steps[kind].append(b.backend.letter_stats().extra_steps - before)
        return result

    with generation(b.backend, b.generation, max_new_tokens=len(letter) + 16, min_new_tokens=0):
        seconds, values = b.timer.rounds({"letter": lambda: answer("letter", letter, OPTIONS),
                                          "free_form": lambda: answer("free_form", letter, []),
                                          "no_letter": lambda: answer("no_letter", no_letter, OPTIONS)},
                                         repeats=2 * b.args.repeats)
    free = seconds["free_form"]
    per_round = {kind: [run / base for run, base in zip(seconds[kind], free)] for kind in ("letter", "no_letter")}
    fallback_step = [miss - hit for miss, hit in zip(seconds["no_letter"], seconds["letter"])]
    tokens = values["free_form"].completion_tokens
    return {
        "answer_tokens": {kind: result.completion_tokens for kind, result in values.items()},
        "median_s": {kind: median(runs) for kind, runs in seconds.items()}, "runs_s": seconds,
        "letter_over_free_form": median(per_round["letter"]),
        "no_letter_over_free_form": median(per_round["no_letter"]),
        "probe_share_of_answer": median(per_round["letter"]) - 1,
        "probe_and_fallback_share_of_answer": median(per_round["no_letter"]) - 1,
        "fallback_step_s": median(fallback_step),
        "fallback_step_share_of_answer": median([step / base for step, base in zip(fallback_step, free)]),
        "fallback_step_in_decode_steps": median(fallback_step) / (median(free) / tokens),
        "extra_steps_per_answer": {kind: max(steps, default=0) for kind, steps in extra_steps.items()},
        "probabilities_read": {kind: len(result.option_probabilities) for kind, result in values.items()},
    }


def phase_compile(b: Bench) -> dict:
    """TransformersConfig(compile=True): a static KV cache (+ transformers' automatic compile of decoding on cuda)."""
    config = dataclasses.replace(b.backend.config, compile=True)
    compiled = (TransformersBackend(config) if b.args.checkpoint
                else TransformersBackend(config, loaded=(b.card_model, b.card_processor)))
    rgb = b.frame()
    first, _ = b.timer.once(lambda: ours_answer(compiled, rgb))   # each call forgets the frame: only decoding differs
    seconds, _ = Timer(b.device, 0, b.args.repeats).rounds({"plain": lambda: b.run_ours(rgb),
                                                             "static": lambda: ours_answer(compiled, rgb)})
    plain, static = median(seconds["plain"]), median(seconds["static"])
    return {"first_call_s": first, "plain_s": plain, "compiled_s": static, "speedup": plain / static}


def log(message: str) -> None:
    print(f"[gpu_latency] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------- main
def parse_args(argv) -> tuple[argparse.Namespace, str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shape on the CPU: a plumbing check")
    parser.add_argument("--checkpoint", help="a real Qwen2.5-VL checkpoint directory for both paths (from_pretrained)")
    parser.add_argument("--device", help="default: cuda, or cpu with --tiny")
    parser.add_argument("--attn", default="auto", help="our backend's attn_implementation (product default auto)")
    parser.add_argument("--new-tokens", type=int, help="forced output length (default 256; 64 with --tiny)")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (default 5; 3 with --tiny)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--large-size", default="1920x1080",
                        help="also compare card vs ours at this size ('' to skip; skipped with --tiny)")
    parser.add_argument("--short-answer", action="store_true",
                        help="scene-only phase on a short forced answer instead of the model card's example (smoke test)")
    parser.add_argument("--compile", action="store_true", help="also time TransformersConfig(compile=True)")
    parser.add_argument("--json", help="result file (default bench/results/gpu_latency[_tiny].json)")
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.tiny else "cuda")
    args.new_tokens = args.new_tokens or (64 if args.tiny else 256)
    args.repeats = args.repeats or (3 if args.tiny else 5)
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --tiny (CPU plumbing check) or on a GPU machine")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2")
    return args, device


def main(argv=None) -> int:
    args, device = parse_args(argv)
    large = "" if args.tiny else args.large_size
    sizes = [args.size] + ([large] if large and large != args.size else [])
    results: dict = {"device": device, "shape": "tiny" if args.tiny else ("checkpoint" if args.checkpoint else "7b"),
                     "torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "new_tokens": args.new_tokens, "plumbing_check_only": bool(args.tiny)}
    started = time.perf_counter()
    b = load(args, device, Timer(device, args.warmup, args.repeats))
    log(f"model ready in {time.perf_counter() - started:.1f} s on {device} ({b.backend.dtype}); "
        f"card attention {b.card_attention}, ours {b.backend.attn_implementation}")
    per_token_bytes, total_bytes = decode_weight_bytes(b.ours_model)
    results.update(attention_card=b.card_attention, attention_ours=b.backend.attn_implementation,
                   dtype=b.backend.dtype, weight_bytes=total_bytes, decode_bytes_per_token=per_token_bytes,
                   weights_gib_allocated=peak_memory(device))
    results["sizes"] = {}
    for size in sizes:
        log(f"{size}: card vs ours, {args.repeats} x {args.new_tokens} tokens each ...")
        results["sizes"][size] = phase_sizes(b, size)
    results.update(phase_roofline(b, results["sizes"][args.size]["ours_decode_ms_per_token"], per_token_bytes))
    results["vision_tower_s"] = phase_vision_tower(b)
    log(f"batch of {args.batch} vs 1 ...")
    results["batch"] = phase_batch(b)
    log(f"{args.batch} questions about one frame vs about {args.batch} frames; a follow-up question ...")
    results["one_frame"] = phase_one_frame(b)
    log("scene-only vs full on the model card's example answer ...")
    results["scene_only"] = phase_scene_only(b)
    log("option probabilities: forced answer with options, free-form, and with no letter after <answer> ...")
    results["option_probabilities"] = phase_option_probabilities(b)
    if args.compile:
        log("compile=True: static cache ...")
        results["compile"] = phase_compile(b)
    report(results, args)
    path = write_results("gpu_latency" + ("_tiny" if args.tiny else ""), {"args": vars(args), **results}, args.json)
    print(f"\nresults: {path}")
    b.backend.close()
    gc.collect()
    return 0


def report(r: dict, args) -> None:
    label = "PLUMBING CHECK (tiny model on the CPU; not a speed claim)" if r["plumbing_check_only"] else "speed"
    print(f"\ngpu_latency: {label}; {machine()}; torch {r['torch']}, transformers {r['transformers']}; "
          f"{r['dtype']}; attention card {r['attention_card']} / ours {r['attention_ours']}; "
          f"{r['new_tokens']} forced tokens")
    rows = []
    for size, s in r["sizes"].items():
        rows.append([size, f"{s['card_s']:.3f}", f"{s['ours_s']:.3f}", f"{s['speedup_card_over_ours']:.2f}x",
                     f"{s['card_tokens_per_s']:.1f} / {s['ours_tokens_per_s']:.1f}",
                     f"{s['card_first_token_s'] * 1000:.1f} / {s['ours_first_token_s'] * 1000:.1f}",
                     f"{s['card_decode_ms_per_token']:.2f} / {s['ours_decode_ms_per_token']:.2f}",
                     f"{s['card_preprocess_s'] * 1000:.1f} / {s['ours_preprocess_s'] * 1000:.1f}",
                     f"{s['card_prompt_tokens']} / {s['ours_prompt_tokens']}", "yes" if s["same_prompt_text"] else "NO",
                     f"{s['peak_gib']:.2f}"])
    print(table(rows, ["image", "card s", "ours s", "card/ours", "tok/s card/ours", "1st token ms card/ours",
                       "decode ms/tok card/ours", "preprocess ms card/ours", "prompt tokens card/ours", "same prompt", "peak GiB"]))
    print(f"\ndecode bytes/token {r['decode_bytes_per_token'] / 1e9:.2f} GB (all weights {r['weight_bytes'] / 1e9:.2f} GB)")
    for key in ("nominal", "measured"):
        if f"roofline_ms_per_token_{key}" in r:
            print(f"roofline ({key} {r['bandwidth'][f'{key}_bytes_per_s'] / 1e12:.2f} TB/s): "
                  f"{r[f'roofline_ms_per_token_{key}']:.2f} ms/token; ours {r[f'ours_decode_vs_roofline_{key}']:.2f}x it")
    print(f"vision tower alone, {args.size}: {1000 * r['vision_tower_s']:.1f} ms")
    b = r["batch"]
    print(f"batch of {b['n']} in one generate: {b['batch_s']:.3f} s vs one request {b['single_s']:.3f} s; "
          f"throughput {b['batch_tokens_per_s']:.1f} vs {b['single_tokens_per_s']:.1f} tok/s = {b['throughput_ratio']:.2f}x; "
          f"peak {b['peak_gib']:.2f} GiB")
    o = r["one_frame"]
    print(f"{o['n']} questions about one frame: {o['shared_s']:.3f} s ({o['images_encoded_shared']} image encoded) vs "
          f"about {o['n']} frames {o['separate_s']:.3f} s ({o['images_encoded_separate']} encoded) = {o['speedup']:.2f}x; "
          f"follow-up question's first token {1000 * o['follow_up_first_token_s']:.1f} ms "
          f"({o['follow_up_prompt_tokens_reused']} prompt tokens reused) vs {1000 * o['follow_up_encoding_only_first_token_s']:.1f} ms "
          f"with only the image encoding kept ({o['prompt_reuse_speedup']:.2f}x) and "
          f"{1000 * o['new_frame_first_token_s']:.1f} ms for a new frame ({o['follow_up_speedup']:.2f}x)")
    s = r["scene_only"]
    print(f"scene-only: {s['scene_only_tokens']} of {s['full_tokens']} tokens ({100 * s['tokens_saved_fraction']:.0f}% saved), "
          f"{s['scene_only_s']:.3f} s vs {s['full_s']:.3f} s ({s['time_saved_ratio']:.2f}x); streamed scene after "
          f"{s['streamed_time_to_scene_s']:.3f} s of {s['streamed_time_to_answer_s']:.3f} s; "
          f"forced text intact: {s['forced_text_came_back']}")
    p = r["option_probabilities"]
    print(f"option probabilities ({p['answer_tokens']['letter']}-token answer): with options "
          f"{p['median_s']['letter']:.3f} s vs free-form {p['median_s']['free_form']:.3f} s, probe "
          f"{p['probe_share_of_answer']:+.2%} of the answer; no letter after <answer> {p['median_s']['no_letter']:.3f} s, "
          f"probe + extra step {p['probe_and_fallback_share_of_answer']:+.2%} (the step alone "
          f"{1000 * p['fallback_step_s']:.1f} ms = {p['fallback_step_share_of_answer']:+.2%}, "
          f"{p['fallback_step_in_decode_steps']:.1f} decode steps)")
    if "compile" in r:
        c = r["compile"]
        print(f"compile=True: first call {c['first_call_s']:.2f} s, then {c['compiled_s']:.3f} s vs {c['plain_s']:.3f} s "
              f"({c['speedup']:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
