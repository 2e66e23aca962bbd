"""Latency of our TransformersBackend against the SpatialThinker-7B model card's own usage code, same process,
same model, same inputs; decode speed against the memory-bandwidth roofline; batching; scene-only; memory.

    PYTHONPATH=. python bench/gpu_latency.py                   # GPU: the 7B shape, random weights, bf16, cuda
    PYTHONPATH=. python bench/gpu_latency.py --compile         # ... plus the static-cache/compile option
    PYTHONPATH=. python bench/gpu_latency.py --checkpoint DIR  # a real checkpoint (e.g. SpatialThinker-7B) instead
    PYTHONPATH=. python bench/gpu_latency.py --tiny            # CPU plumbing check: tiny shape, same code paths

ROS-free: imports torch, transformers and the package's ROS-free core only, so it runs from a source checkout
on a GPU machine without ROS. Nothing is downloaded.

The model. Without --checkpoint, a Qwen2_5_VLForConditionalGeneration of the real Qwen2.5-VL-7B shape with
random weights is built directly on the device, with a processor whose tokenizer has Qwen's special tokens at the
real ids (bench/_speedmodel.py). Speed does not depend on weight values when the output length is forced
(min_new_tokens == max_new_tokens), so it times like SpatialThinker-7B. Both paths share that one model object
(loading is not timed: neither side loads anything). Our backend gets it through a patched loader; everything
after loading is the product's code.

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
import gc
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from _common import machine, table, write_results

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402

import spatialthinker_ros.core.backends.transformers_backend as transformers_backend  # noqa: E402
from spatialthinker_ros.core.backends.base import GenerationConfig  # noqa: E402
from spatialthinker_ros.core.backends.transformers_backend import TransformersBackend, TransformersConfig  # noqa: E402
from spatialthinker_ros.core.parsing import scene_text_complete  # noqa: E402
from spatialthinker_ros.core.pipeline import PipelineConfig, finish_result, prepare_request  # noqa: E402
from spatialthinker_ros.core.types import BackendError  # noqa: E402

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
def ours_answer(backend, rgb: np.ndarray, question: str = QUESTION, options=OPTIONS, scene_only: bool = False,
                on_text=None, keep: bool = False):
    """One request. The backend forgets what it kept of earlier frames first (unless `keep`): their image encodings
    and prompt KV. The card's code starts from nothing for every question, as a new camera frame would."""
    if not keep:
        forget_frames(backend)
    request = prepare_request(rgb, question, options, PipelineConfig(), scene_only=scene_only, on_text=on_text)
    [result] = backend.generate([request])
    if isinstance(result, BackendError):
        raise RuntimeError(f"backend error: {result}")
    finish_result(request, result, options, camera_size=(rgb.shape[1], rgb.shape[0]))
    return result, request


def forget_frames(backend, encodings: bool = True) -> None:
    if encodings:
        backend._encoder.clear()
    if backend._prompts:   # None where prompt KV is not reused (compile=True, transformers < 5.23)
        backend._prompts.clear()


def ours_batch(backend, frames: list[np.ndarray]):
    """One question per frame, all in one generate; nothing encoded before counts."""
    forget_frames(backend)
    requests = [prepare_request(rgb, q, [], PipelineConfig()) for rgb, q in zip(frames, BATCH_QUESTIONS * 8)]
    results = backend.generate(requests)
    for rgb, request, result in zip(frames, requests, results):
        if isinstance(result, BackendError):
            raise RuntimeError(f"backend error: {result}")
        finish_result(request, result, [], camera_size=(rgb.shape[1], rgb.shape[0]))
    return results


class ForceText(LogitsProcessor):
    """Makes every row write `ids` and then <|im_end|>: a random model answering like SpatialThinker does."""

    def __init__(self, ids: list[int], eos: int):
        self.sequence, self.start = ids + [eos], None

    def __call__(self, input_ids, scores):
        self.start = self.start or input_ids.shape[1]
        step = min(input_ids.shape[1] - self.start, len(self.sequence) - 1)
        forced = torch.full_like(scores, -math.inf)
        forced[:, self.sequence[step]] = 0.0
        return forced


class Forced:
    """Context manager: model.generate writes the given text (a fresh ForceText per call)."""

    def __init__(self, model, ids: list[int], eos: int):
        self.model, self.ids, self.eos = model, ids, eos

    def __enter__(self):
        original = self.original = self.model.generate

        def generate(*args, **kwargs):
            return original(*args, logits_processor=LogitsProcessorList([ForceText(self.ids, self.eos)]), **kwargs)
        self.model.generate = generate
        return self

    def __exit__(self, *exc):
        del self.model.generate    # back to the class method


class Kwargs:
    """Context manager: the backend's generate() kwargs changed for one phase (length, cache); restored after."""

    def __init__(self, backend, **changes):
        self.backend, self.changes = backend, changes

    def __enter__(self):
        self.saved = dict(self.backend._generate_kwargs)
        for key, value in self.changes.items():
            if value is None:
                self.backend._generate_kwargs.pop(key, None)
            else:
                self.backend._generate_kwargs[key] = value

    def __exit__(self, *exc):
        self.backend._generate_kwargs = self.saved


# ---------------------------------------------------------------------------------------------------- helpers
class Clock:
    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn, *args, **kwargs):
        self.sync()
        started = time.perf_counter()
        value = fn(*args, **kwargs)
        self.sync()
        return time.perf_counter() - started, value


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


def set_attention(model, implementation: str) -> None:
    current = getattr(model.config, "_attn_implementation", None)
    if current == implementation:
        return
    if not hasattr(model, "set_attn_implementation"):
        raise RuntimeError(f"this transformers cannot switch attention {current} -> {implementation} in place; "
                           "rerun with --attn sdpa")
    model.set_attn_implementation(implementation)


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


def vision_seconds(model, processor, rgb: np.ndarray, backend, clock: Clock, repeats: int) -> float:
    """The vision tower alone on one frame (what a per-frame cache would save for each further question)."""
    inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[rgb], return_tensors="pt",
                       **backend._image_kwargs).to(model.device)
    visual = getattr(getattr(model, "model", model), "visual", None) or model.visual
    pixels = inputs["pixel_values"].to(next(visual.parameters()).dtype)
    samples = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            seconds, _ = clock.time(visual, pixels, grid_thw=inputs["image_grid_thw"])
            samples.append(seconds)
    return statistics.median(samples[1:])


def preprocess_seconds(card_processor, backend, image, rgb, card_text, our_prompt, repeats) -> tuple[float, float]:
    """The processor call alone (chat template + image resize/normalise + tokenise), as each path makes it (CPU)."""
    card_messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                  {"type": "text", "text": card_text}]}]

    def card():
        text = card_processor.apply_chat_template(card_messages, tokenize=False, add_generation_prompt=True)
        card_processor(text=[text], images=[image], return_tensors="pt")

    def ours():
        processor = backend._processor
        text = processor.apply_chat_template(transformers_backend._messages(our_prompt), tokenize=False,
                                             add_generation_prompt=True)
        processor(text=[text], images=[rgb], padding=True, return_tensors="pt", **backend._image_kwargs)

    timings = ([], [])
    for _ in range(repeats + 1):
        for fn, samples in zip((card, ours), timings):
            started = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - started)
    return median(timings[0][1:]), median(timings[1][1:])


def median(values):
    return statistics.median(values) if values else float("nan")


# ------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
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
    clock = Clock(device)
    large = "" if args.tiny else args.large_size
    sizes = [args.size] + ([large] if large and large != args.size else [])
    results: dict = {"device": device, "shape": "tiny" if args.tiny else ("checkpoint" if args.checkpoint else "7b"),
                     "torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "new_tokens": args.new_tokens, "plumbing_check_only": bool(args.tiny)}
    log = lambda message: print(f"[gpu_latency] {message}", file=sys.stderr, flush=True)  # noqa: E731

    # ---- the model: shared by both paths (or loaded by each from a real checkpoint)
    started = time.perf_counter()
    generation = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    if args.checkpoint:
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        card_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.checkpoint, torch_dtype="auto",
                                                                        device_map="auto")
        card_processor = AutoProcessor.from_pretrained(args.checkpoint)
        backend = TransformersBackend(TransformersConfig(model=args.checkpoint, device=device, attn_implementation=args.attn,
                                                         generation=generation, local_files_only=True))
        ours_model = backend._model
    else:
        from _speedmodel import build_speed_model

        shape = "tiny" if args.tiny else "7b"
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        card_model, card_processor = build_speed_model(shape, device, dtype, attn_implementation="sdpa")
        ours_model = card_model

        def load(config, device_, dtype_, attention):       # replaces from_pretrained; the rest is the product
            if dtype_ != card_model.dtype:
                raise RuntimeError(f"backend wants {dtype_}, the speed model is {card_model.dtype}")
            set_attention(card_model, attention)
            return card_model, card_processor

        transformers_backend._load = load
        backend = TransformersBackend(TransformersConfig(model=str(Path.cwd()), device=device, attn_implementation=args.attn,
                                                         generation=generation))
    card_attention = "sdpa"
    ours_attention = backend.attn_implementation
    log(f"model ready in {time.perf_counter() - started:.1f} s on {device} ({backend.dtype}); "
        f"card attention {card_attention}, ours {ours_attention}")
    per_token_bytes, total_bytes = transformers_backend_weight_bytes(ours_model)
    results.update(attention_card=card_attention, attention_ours=ours_attention, dtype=backend.dtype,
                   weight_bytes=total_bytes, decode_bytes_per_token=per_token_bytes,
                   weights_gib_allocated=peak_memory(device))

    def run_card(image, n):
        if ours_model is card_model:
            set_attention(card_model, card_attention)
        return clock.time(card_answer, card_model, card_processor, image, CARD_QUESTION, n)

    def run_ours(rgb, **kwargs):
        if ours_model is card_model:
            set_attention(card_model, ours_attention)
        return clock.time(ours_answer, backend, rgb, **kwargs)

    # ---- A/B: end to end, card vs ours, interleaved; then the same with one output token (prefill)
    results["sizes"] = {}
    for size in sizes:
        width, height = (int(v) for v in size.split("x"))
        rgb = camera_frame(width, height)
        image = Image.fromarray(rgb)
        log(f"{size}: card vs ours, {args.repeats} x {args.new_tokens} tokens each ...")
        card_s, ours_s, card_first, ours_first = [], [], [], []
        reset_peak(device)
        for i in range(args.warmup + args.repeats):
            seconds, (text, card_tokens, card_prompt, card_text) = run_card(image, args.new_tokens)
            if i >= args.warmup:
                card_s.append(seconds)
            seconds, (result, request) = run_ours(rgb)
            if i >= args.warmup:
                ours_s.append(seconds)
        same_prompt = card_text == request.prompt
        peak = peak_memory(device)
        with Kwargs(backend, max_new_tokens=1, min_new_tokens=1):
            for i in range(args.warmup + args.repeats):
                seconds, _ = run_card(image, 1)
                if i >= args.warmup:
                    card_first.append(seconds)
                seconds, _ = run_ours(rgb)
                if i >= args.warmup:
                    ours_first.append(seconds)
        preprocess = preprocess_seconds(card_processor, backend, image, rgb, card_text, request.prompt, args.repeats)
        card_decode = (median(card_s) - median(card_first)) / (args.new_tokens - 1)
        ours_decode = (median(ours_s) - median(ours_first)) / (args.new_tokens - 1)
        results["sizes"][size] = {
            "card_s": median(card_s), "ours_s": median(ours_s), "card_runs": card_s, "ours_runs": ours_s,
            "speedup_card_over_ours": median(card_s) / median(ours_s),
            "card_tokens": card_tokens, "ours_tokens": result.completion_tokens,
            "card_prompt_tokens": card_prompt, "ours_prompt_tokens": result.prompt_tokens,
            "card_tokens_per_s": card_tokens / median(card_s), "ours_tokens_per_s": result.completion_tokens / median(ours_s),
            "card_first_token_s": median(card_first), "ours_first_token_s": median(ours_first),
            "card_decode_ms_per_token": 1000 * card_decode, "ours_decode_ms_per_token": 1000 * ours_decode,
            "same_prompt_text": same_prompt, "peak_gib": peak,
            "card_preprocess_s": preprocess[0], "ours_preprocess_s": preprocess[1],
        }
        if card_tokens != args.new_tokens or result.completion_tokens != args.new_tokens:
            log(f"WARNING: forced length not honoured: card {card_tokens}, ours {result.completion_tokens}")

    # ---- roofline
    main_size = results["sizes"][args.size]
    bw = bandwidth(device)
    results["bandwidth"] = bw
    for key in ("nominal", "measured"):
        value = bw[f"{key}_bytes_per_s"]
        if value:
            roofline_ms = 1000 * per_token_bytes / value
            results[f"roofline_ms_per_token_{key}"] = roofline_ms
            results[f"ours_decode_vs_roofline_{key}"] = main_size["ours_decode_ms_per_token"] / roofline_ms

    # ---- where the prefill goes: the vision tower alone
    rgb = camera_frame(*(int(v) for v in args.size.split("x")))
    set_attention(ours_model, ours_attention)
    results["vision_tower_s"] = vision_seconds(ours_model, backend._processor, rgb, backend, clock, args.repeats)

    # ---- 8 concurrent requests (one batched generate) vs 1
    log(f"batch of {args.batch} vs 1 ...")
    reset_peak(device)
    single, batched = [], []
    for i in range(args.warmup + max(1, args.repeats // 2)):
        seconds, _ = run_ours(rgb)
        if i >= args.warmup:
            single.append(seconds)
        set_attention(ours_model, ours_attention)
        seconds, batch_results = clock.time(ours_batch, backend, frames_one_pixel_apart(rgb, args.batch))
        if i >= args.warmup:
            batched.append(seconds)
    batch_tokens = sum(r.completion_tokens for r in batch_results)
    results["batch"] = {
        "n": args.batch, "single_s": median(single), "batch_s": median(batched),
        "single_tokens_per_s": args.new_tokens / median(single), "batch_tokens_per_s": batch_tokens / median(batched),
        "throughput_ratio": (batch_tokens / median(batched)) / (args.new_tokens / median(single)),
        "latency_ratio": median(batched) / median(single), "peak_gib": peak_memory(device),
    }

    # ---- several questions about one frame: its encoding shared, against the same batch about distinct frames
    log(f"{args.batch} questions about one frame vs about {args.batch} frames; a follow-up question ...")
    one_frame, distinct = [rgb] * args.batch, frames_one_pixel_apart(rgb, args.batch)
    shared_s, separate_s, encoded = [], [], []
    for i in range(args.warmup + max(1, args.repeats // 2)):
        for frames, samples in ((one_frame, shared_s), (distinct, separate_s)):
            set_attention(ours_model, ours_attention)
            before = backend._encoder.images_encoded
            seconds, _ = clock.time(ours_batch, backend, frames)
            if i >= args.warmup:
                samples.append(seconds)
                encoded.append(backend._encoder.images_encoded - before)
    # a follow-up's first token: with the first question's prompt KV and encoding kept (the product), with only the
    # encoding kept (before prompt KV reuse), and for a new frame (nothing kept)
    follow_up_s, encoding_only_s, new_frame_s, reused = [], [], [], []
    with Kwargs(backend, max_new_tokens=1, min_new_tokens=1):
        for i in range(args.warmup + args.repeats):
            run_ours(rgb)                                                   # the first question about the frame
            before = backend._prompts.tokens_reused if backend._prompts else 0
            follow_up, _ = run_ours(rgb, question=BATCH_QUESTIONS[1], options=[], keep=True)
            after = backend._prompts.tokens_reused if backend._prompts else 0
            forget_frames(backend, encodings=False)
            encoding_only, _ = run_ours(rgb, question=BATCH_QUESTIONS[1], options=[], keep=True)
            new_frame, _ = run_ours(distinct[1], question=BATCH_QUESTIONS[1], options=[], keep=True)
            if i >= args.warmup:
                follow_up_s.append(follow_up)
                encoding_only_s.append(encoding_only)
                new_frame_s.append(new_frame)
                reused.append(after - before)
    results["one_frame"] = {
        "n": args.batch, "shared_s": median(shared_s), "separate_s": median(separate_s),
        "speedup": median(separate_s) / median(shared_s),
        "images_encoded_shared": encoded[0], "images_encoded_separate": encoded[1],
        "follow_up_first_token_s": median(follow_up_s), "new_frame_first_token_s": median(new_frame_s),
        "follow_up_encoding_only_first_token_s": median(encoding_only_s),
        "follow_up_speedup": median(new_frame_s) / median(follow_up_s),
        "prompt_reuse_speedup": median(encoding_only_s) / median(follow_up_s),
        "follow_up_prompt_tokens_reused": reused[0],
    }

    # ---- scene-only vs full answers, and time to scene (the action's early feedback), on a forced answer
    log("scene-only vs full on the model card's example answer ...")
    from _speedmodel import CARD_EXAMPLE_RESPONSE, SHORT_RESPONSE

    answer_text = SHORT_RESPONSE if args.short_answer else CARD_EXAMPLE_RESPONSE
    tokenizer = backend._tokenizer
    script = tokenizer.encode(answer_text, add_special_tokens=False)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    scene_s, full_s, to_scene = [], [], []
    with Forced(ours_model, script, eos), Kwargs(backend, max_new_tokens=len(script) + 16, min_new_tokens=None):
        for i in range(args.warmup + args.repeats):
            seconds, (scene_result, _) = run_ours(rgb, scene_only=True)
            if i >= args.warmup:
                scene_s.append(seconds)
            marks: dict = {}
            begun = time.perf_counter()

            def on_text(text: str, tokens: int, marks=marks, begun=begun) -> None:
                if "scene" not in marks and scene_text_complete(text):
                    marks["scene"] = (time.perf_counter() - begun, tokens)
            seconds, (full_result, _) = run_ours(rgb, on_text=on_text)
            if i >= args.warmup:
                full_s.append(seconds)
                to_scene.append(marks.get("scene", (float("nan"), 0))[0])
    results["scene_only"] = {
        "full_tokens": full_result.completion_tokens, "scene_only_tokens": scene_result.completion_tokens,
        "tokens_saved_fraction": 1 - scene_result.completion_tokens / full_result.completion_tokens,
        "full_s": median(full_s), "scene_only_s": median(scene_s), "time_saved_ratio": median(full_s) / median(scene_s),
        "streamed_time_to_scene_s": median(to_scene), "streamed_time_to_answer_s": median(full_s),
        "scene_complete_in_scene_only_text": scene_text_complete(scene_result.text),
        "forced_text_came_back": full_result.text == answer_text,
    }

    # ---- static KV cache (+ transformers' automatic compile of decoding on cuda)
    if args.compile:
        log("compile=True: static cache ...")
        if args.checkpoint:
            compiled = TransformersBackend(dataclass_replace(backend.config, compile=True))
        else:
            compiled = TransformersBackend(TransformersConfig(model=str(Path.cwd()), device=device, attn_implementation=args.attn,
                                                              generation=generation, compile=True))
        first, _ = clock.time(ours_answer, compiled, rgb)   # each call forgets the frame: only decoding differs
        plain, static = [], []
        for _ in range(args.repeats):
            set_attention(ours_model, ours_attention)
            seconds, _ = clock.time(ours_answer, backend, rgb)
            plain.append(seconds)
            seconds, _ = clock.time(ours_answer, compiled, rgb)
            static.append(seconds)
        results["compile"] = {"first_call_s": first, "plain_s": median(plain), "compiled_s": median(static),
                              "speedup": median(plain) / median(static)}

    report(results, args)
    suffix = "_tiny" if args.tiny else ""
    path = write_results(f"gpu_latency{suffix}", {"args": vars(args), **results}, args.json)
    print(f"\nresults: {path}")
    backend.close()
    gc.collect()
    return 0


def transformers_backend_weight_bytes(model) -> tuple[int, int]:
    from _speedmodel import decode_weight_bytes

    return decode_weight_bytes(model)


def dataclass_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


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
    if "compile" in r:
        c = r["compile"]
        print(f"compile=True: first call {c['first_call_s']:.2f} s, then {c['compiled_s']:.3f} s vs {c['plain_s']:.3f} s "
              f"({c['speedup']:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
