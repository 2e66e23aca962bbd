"""SpatialThinker (any Qwen2.5-VL checkpoint) in this process with transformers: one batched generate per call.

Importing this module imports torch and transformers; `create_backend` imports it only when asked for this backend.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import importlib.util
import inspect
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import transformers
from packaging.version import Version
from transformers import (
    AutoConfig,
    AutoProcessor,
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    Qwen2_5_VLForConditionalGeneration,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation import BaseStreamer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import is_flash_attn_2_available

from spatialthinker_ros.core.backends.base import (LETTER_FORMS, SCENE_END_TAG, GenerationConfig, LetterPosition,
                                                   TextSink, cut_after_scene_end, letter_written, renormalised)
from spatialthinker_ros.core.prompt import option_letter
from spatialthinker_ros.core.backends.settings import TransformersConfig
from spatialthinker_ros.core.text import excerpt
from spatialthinker_ros.core.types import BackendError, BackendErrorKind, InferenceRequest, InferenceResult

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}   # settings.DTYPES
# transformers renamed from_pretrained's torch_dtype to dtype in 4.56; an unknown name would be silently ignored.
_DTYPE_ARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
# Streaming decodes a row's whole text; doing it every few tokens (or when a tag may have closed) bounds the cost.
_STREAM_EVERY_TOKENS = 8
# "</scene>" is 8 characters and every token holds at least one byte, so a newly completed tag lies in the last 8.
_SCENE_TAIL_TOKENS = 10
# Vision-tower outputs kept for follow-up questions about a recent image (memory per entry: bench/README.md).
_ENCODINGS_KEPT = 4
# Prompt KV caches kept for follow-up questions (memory per entry: bench/README.md).
_PROMPTS_KEPT = 4
# Continuing generation from a prompt's KV cache relies on how transformers positions the uncached tokens of a
# Qwen2.5-VL prompt (the image's stored rope offset); verified with this version, older ones prefill whole prompts.
_PROMPT_REUSE = Version(transformers.__version__) >= Version("5.23")
# Image embeddings computed here (so they can be kept) reach generate as `mm_encoder_outputs` (transformers 5.2x).
_PRECOMPUTED_IMAGES = "mm_encoder_outputs" in inspect.signature(Qwen2_5_VLForConditionalGeneration.forward).parameters


class TransformersBackend:
    """Qwen2_5_VLForConditionalGeneration + AutoProcessor, greedy by default, every call one batched generate."""

    name = "transformers"
    max_image_pixels = None   # the processor in this process applies config.max_pixels itself

    def __init__(self, config: TransformersConfig, loaded: Optional[tuple[Any, Any]] = None):
        """Loads config.model, unless `loaded` gives a (model, processor) already built on the configured device
        and dtype (a benchmark shares one model object between two code paths); everything after loading is the
        same."""
        self.config = config
        self.model_name = config.model
        self.max_batch_size = config.max_batch_size
        self._device = _resolve_device(config.device)
        dtype = _resolve_dtype(config.dtype, self._device)
        self.attn_implementation = _resolve_attention(config.attn_implementation, self._device, dtype)
        self.device = str(self._device)
        self.dtype = str(dtype).removeprefix("torch.")
        started = time.perf_counter()
        self._model, self._processor = loaded or _load(config, self._device, dtype, self.attn_implementation)
        self._tokenizer = self._processor.tokenizer
        self._tokenizer.padding_side = "left"   # generation continues every row from its last column
        self._image_kwargs = _image_size_kwargs(self._processor.image_processor, config)
        self._generate_kwargs = _generate_kwargs(config.generation, config.compile)
        self._make_logits_processors: Optional[Callable[[], Sequence[LogitsProcessor]]] = None
        tower = _vision_tower(self._model)
        # None where this transformers cannot take precomputed image embeddings: the tower then runs in generate
        self.image_encodings: Optional[ImageEncodingCache] = (
            ImageEncodingCache(tower, _ENCODINGS_KEPT) if _PRECOMPUTED_IMAGES else None)
        # a static cache (compile) cannot continue from another cache
        self.prompts: Optional[PromptCache] = (
            PromptCache(_PROMPTS_KEPT)
            if config.reuse_prompts and _PROMPT_REUSE and _PRECOMPUTED_IMAGES and not config.compile else None)
        self._letters: Optional[LetterTokens] = None   # made at the first question with options
        self._letter_rows = self._letter_fallback_steps = 0
        self._eos_ids = _token_ids(self._model.generation_config.eos_token_id)
        self._end_ids = self._eos_ids | _token_ids(self._model.generation_config.pad_token_id)
        log.info(
            "loaded %s on %s (%s, %s) in %.1f s",
            config.model, self.device, self.dtype, self.attn_implementation, time.perf_counter() - started,
        )

    def generate(self, requests: Sequence[InferenceRequest]) -> list[Union[InferenceResult, BackendError]]:
        if len(requests) > self.max_batch_size:
            raise ValueError(f"{len(requests)} requests exceed max_batch_size {self.max_batch_size}")
        if not requests:
            return []
        if self._model is None:
            return [BackendError(BackendErrorKind.UNAVAILABLE, "the transformers backend is closed") for _ in requests]
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                return self._generate(requests, started)
        except Exception as exc:  # the whole batch shares one forward pass, so it shares the failure
            kind, message = self._classify(exc)
        if kind is BackendErrorKind.OUT_OF_MEMORY and torch.cuda.is_available():
            self.forget()
            gc.collect()   # here, not in the except block, whose traceback still held the failed step's tensors
            torch.cuda.empty_cache()
        return [BackendError(kind, message) for _ in requests]

    def close(self) -> None:
        if self._model is None:
            return
        self.forget()
        self._model = self._processor = self._tokenizer = self.image_encodings = self.prompts = None
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def model(self) -> Any:
        """The loaded Qwen2_5_VLForConditionalGeneration (None once closed)."""
        return self._model

    @property
    def processor(self) -> Any:
        """Its AutoProcessor (None once closed)."""
        return self._processor

    def set_generation(self, generation: GenerationConfig) -> None:
        """Decoding settings for the next calls (the benchmarks time one output length, then another)."""
        self._generate_kwargs = _generate_kwargs(generation, self.config.compile)

    def set_logits_processors(self, make: Optional[Callable[[], Sequence[LogitsProcessor]]]) -> None:
        """Extra transformers LogitsProcessors for the next calls (None: none again). `make` is called once per
        model.generate call, so processors that keep per-call state start fresh; they run after generate's own and
        after the option-letter probe, which reads the model's scores.
        Benchmarks and tests force a known answer from a random model with it, or read the scores."""
        self._make_logits_processors = make

    def forget(self, images: bool = True, prompts: bool = True) -> None:
        """Drops what is kept of earlier frames: image encodings and/or prompt KV caches."""
        if images and self.image_encodings is not None:
            self.image_encodings.clear()
        if prompts and self.prompts is not None:
            self.prompts.clear()

    def cache_stats(self) -> dict[str, Optional[CacheStats]]:
        """Each cache's counters (None where that cache is off)."""
        return {"image_encodings": self.image_encodings.stats() if self.image_encodings is not None else None,
                "prompts": self.prompts.stats() if self.prompts is not None else None}

    def letter_stats(self) -> LetterStats:
        """How many answers were probed for option letters, and how many of them needed the extra step (no letter
        written after <answer>)."""
        return LetterStats(probed=self._letter_rows, fallback_steps=self._letter_fallback_steps)

    def prepare_inputs(self, requests: Sequence[InferenceRequest]) -> Any:
        """The processor's tensors for a batch, on the CPU: chat template, image resize within the pixel limits,
        tokens (left-padded)."""
        texts = [
            self._processor.apply_chat_template(_messages(r.prompt), tokenize=False, add_generation_prompt=True)
            for r in requests
        ]
        return self._processor(
            text=texts, images=[r.image for r in requests], padding=True, return_tensors="pt", **self._image_kwargs
        )

    def _generate(self, requests: Sequence[InferenceRequest], started: float) -> list[InferenceResult]:
        inputs = self.prepare_inputs(requests).to(self._model.device)
        prompt_length = inputs["input_ids"].shape[1]
        scene_rows = [row for row, r in enumerate(requests) if r.scene_only]
        scene_stop = _SceneStop(self._tokenizer, scene_rows, prompt_length) if scene_rows else None
        streamer = (
            _RowStreamer(self._tokenizer, [r.on_text for r in requests], self._end_ids)
            if any(r.on_text for r in requests)
            else None
        )
        letters = self._letter_tokens()
        probed = {row: len(r.offered_options) for row, r in enumerate(requests) if r.offered_options and not r.scene_only}
        probe = LetterProbe(letters, list(probed), prompt_length) if probed else None
        self._letter_rows += len(probed)
        keys = [image_key(r.image) for r in requests]
        # one question: continue from the KV of an earlier prompt about the same image where the two prompts agree
        prompt_ids = inputs["input_ids"][0].tolist() if self.prompts is not None and len(requests) == 1 else None
        continued = self.prompts.continuation(keys[0], prompt_ids) if prompt_ids else None
        if continued is not None:   # the image is in the kept KV; Qwen2.5-VL places what follows by its rope offset
            self._model.model.rope_deltas = continued.rope_deltas
            model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                            "past_key_values": continued.cache}
        elif self.image_encodings is not None:
            embeddings = self.image_encodings.encode(keys, inputs["pixel_values"], inputs["image_grid_thw"])
            model_inputs = {key: value for key, value in inputs.items() if key != "pixel_values"}
            model_inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=embeddings)}
        else:
            model_inputs = inputs
        # The probe reads the model's own scores, before any processor a caller added (set_logits_processors).
        processors = [probe.scores_reader] if probe else []
        if self._make_logits_processors is not None:
            processors.extend(self._make_logits_processors())
        criteria = [c for c in (scene_stop, probe.token_follower if probe else None) if c is not None]
        output = self._model.generate(
            **model_inputs,
            **self._generate_kwargs,
            stopping_criteria=StoppingCriteriaList(criteria) if criteria else None,
            logits_processor=LogitsProcessorList(processors) if processors else None,
            streamer=streamer,
            return_dict_in_generate=True,
        )
        rope_deltas = self._model.model.rope_deltas
        readings = {row: self._read_letters(probe, row, count, output, inputs["attention_mask"], rope_deltas)
                    for row, count in probed.items()}
        if prompt_ids:
            self.prompts.store(keys[0], prompt_ids, output.past_key_values, rope_deltas)
        seconds = time.perf_counter() - started
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        stopped_at = scene_stop.stopped_at if scene_stop else {}
        results = []
        for row, ids in enumerate(output.sequences[:, prompt_length:].tolist()):
            count = stopped_at.get(row) or _count_through_eos(ids, self._eos_ids)
            text = self._tokenizer.decode(ids[:count], skip_special_tokens=True)
            if requests[row].scene_only:
                text = cut_after_scene_end(text)
            if streamer:
                streamer.finish(row, text, count)
            probabilities, note = readings.get(row, ((), ""))
            results.append(
                InferenceResult(
                    text=text,
                    prompt_tokens=int(prompt_tokens[row]),
                    completion_tokens=count,
                    model=self.model_name,
                    seconds=seconds,
                    option_probabilities=probabilities,
                    option_probabilities_note=note,
                )
            )
        return results

    def _letter_tokens(self) -> LetterTokens:
        if self._letters is None:
            self._letters = LetterTokens(self._tokenizer)
        return self._letters

    def _read_letters(self, probe: LetterProbe, row: int, count: int, output: Any, attention_mask: torch.Tensor,
                      rope_deltas: torch.Tensor) -> tuple[tuple[float, ...], str]:
        """Row's probabilities of its `count` offered letters at its answer's letter position, or () and why not.

        Where the model wrote no letter there, the letter distribution is read one step further, as if it had
        written "(" (the card's "<answer> (B) ..."): one more step continued from the generation's KV cache."""
        record = probe.records.get(row)
        if record is None:
            return (), "the answer has no <answer> tag to read the option letter's probabilities at"
        sequence = output.sequences[row]
        column = probe.prompt_length + record.step
        if column >= sequence.shape[0]:
            return (), "the answer was cut off at its option letter"
        chosen = int(sequence[column])
        letters = probe.letters
        position = LetterPosition()
        position.feed("<answer" + record.run)
        position.feed(letters.piece(chosen))
        if not position.found:
            return (), "the answer was cut off at its option letter"
        if chosen not in letters.ids(record.run) and not record.run.endswith("("):
            if not _PROMPT_REUSE or self.config.compile:
                return (), ("the model wrote no option letter after <answer>, and this setup cannot continue from "
                            "the generation's cache to read one (transformers >= 5.23 without compile can)")
            suffix = (">" if not record.run else "") + ("(" if record.run.endswith((" ", "\n")) else " (")
            logits = self._letter_logits_after(output, row, column, suffix, attention_mask, rope_deltas,
                                               letters.index(record.run + suffix, sequence.device))
            self._letter_fallback_steps += 1
            record = _LetterRecord(record.step, record.run + suffix, logits)
        return letters.probabilities(record.run, record.logits.tolist(), count)

    def _letter_logits_after(self, output: Any, row: int, column: int, suffix: str, attention_mask: torch.Tensor,
                             rope_deltas: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The scores of `ids` after the row's first `column` tokens and then `suffix`: one generate step from the
        row's slice of the generation's KV cache (which holds every column before the last generated token)."""
        cache = DynamicCache([(layer.keys[row:row + 1, :, :column], layer.values[row:row + 1, :, :column])
                              for layer in output.past_key_values.layers])
        suffix_ids = torch.tensor(self._tokenizer.encode(suffix, add_special_tokens=False),
                                  device=output.sequences.device)
        ids_in = torch.cat([output.sequences[row, :column], suffix_ids])[None]
        prompt_mask = attention_mask[row]
        mask = torch.cat([prompt_mask, prompt_mask.new_ones(ids_in.shape[1] - prompt_mask.shape[0])])[None]
        first = _FirstScores(ids)
        self._model.model.rope_deltas = rope_deltas[row:row + 1]
        self._model.generate(input_ids=ids_in, attention_mask=mask, past_key_values=cache, max_new_tokens=1,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             logits_processor=LogitsProcessorList([first]))
        return first.logits

    def _classify(self, exc: Exception) -> tuple[BackendErrorKind, str]:
        if isinstance(exc, torch.cuda.OutOfMemoryError) or (
            isinstance(exc, RuntimeError) and "out of memory" in str(exc)
        ):
            log.warning("out of memory in generate: %s", exc)
            return BackendErrorKind.OUT_OF_MEMORY, f"out of memory on {self.device}: {_describe(exc)}"
        log.exception("generate failed")
        return BackendErrorKind.FAILED, f"generation failed: {_describe(exc)}"


def _messages(prompt: str) -> list[dict[str, Any]]:
    """The model card's single user turn (image, then text); the chat template adds Qwen's default system turn."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


@dataclass(frozen=True)
class CacheStats:
    """What a cache holds now and how often it served (benchmarks and tests read it)."""

    entries: int   # kept now
    hits: int      # images not encoded again / prompt tokens not prefilled again
    misses: int    # images encoded / one-question prompts with nothing to continue from


@dataclass(frozen=True)
class LetterStats:
    """Option-letter probing since the backend was made (benchmarks and tests read it)."""

    probed: int           # answers to questions with options that the letter probe followed
    fallback_steps: int   # extra forward steps run because an answer wrote no letter after <answer>


class ImageEncodingCache:
    """Vision-tower outputs (merged image embeddings) of the last few images, by key: questions about one frame,
    in one batch or in calls shortly after each other, share its encoding.

    `encode` runs the tower once, on the images of a batch not kept yet, and returns every image's embeddings in
    batch order; the backend hands them to generate as precomputed encoder outputs.
    """

    def __init__(self, tower: torch.nn.Module, kept: int):
        self._tower = tower
        self._kept = kept
        self._encodings: OrderedDict[bytes, torch.Tensor] = OrderedDict()   # key -> merged image embeddings
        self._hits = self._misses = 0

    def encode(self, keys: Sequence[bytes], pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """keys[i] names image i of the batch (`image_key`); pixel_values and grid_thw are the processor's."""
        if len(keys) != len(grid_thw):
            raise ValueError(f"{len(keys)} keys for {len(grid_thw)} images")
        patches = grid_thw.prod(-1).tolist()
        blocks = pixel_values.split(patches)
        batch = {key: self._encodings[key] for key in keys if key in self._encodings}
        first: dict[bytes, int] = {}   # each image not encoded yet -> its first place in the batch
        for index, key in enumerate(keys):
            if key not in batch:
                first.setdefault(key, index)
        self._hits += len(keys) - len(first)
        if first:
            order = list(first.values())
            output = self._tower(torch.cat([blocks[i] for i in order]).type(self._tower.dtype), grid_thw=grid_thw[order])
            merged = output if isinstance(output, torch.Tensor) else output.pooler_output
            tokens = [patches[i] // self._tower.spatial_merge_size**2 for i in order]
            # clones, so a kept encoding does not hold the whole batch's output alive
            batch.update((key, encoding.clone()) for key, encoding in zip(first, merged.split(tokens)))
            self._misses += len(first)
        for key in keys:   # newest last; the oldest beyond `kept` are forgotten
            self._encodings[key] = batch[key]
            self._encodings.move_to_end(key)
        while len(self._encodings) > self._kept:
            self._encodings.popitem(last=False)
        return tuple(batch[key] for key in keys)

    def stats(self) -> CacheStats:
        return CacheStats(entries=len(self._encodings), hits=self._hits, misses=self._misses)

    def clear(self) -> None:
        self._encodings.clear()


@dataclass(frozen=True)
class Continuation:
    """Where a follow-up prompt starts: the KV of the part it shares with a kept prompt, and Qwen2.5-VL's rope
    offset for the tokens after that prompt's image (generate places the uncached tokens with it)."""

    cache: Any                  # a transformers DynamicCache of the shared tokens (a copy: generate extends it)
    rope_deltas: torch.Tensor


@dataclass
class _Prompt:
    ids: list[int]
    cache: Any                  # transformers DynamicCache holding exactly the prompt's tokens
    rope_deltas: torch.Tensor


class PromptCache:
    """KV caches of recent one-question prompts, by image: a follow-up question about the same frame prefills only
    the part of its prompt that differs, its question (the system turn, the image and the instruction come first).

    A lookup returns the shared KV with the rope offset stored alongside; the caller puts that offset on the model
    before generating (a call about another image may have changed it). Only one-question calls are kept: in a
    left-padded batch the prompts do not start at the same position.
    """

    def __init__(self, kept: int):
        self._kept = kept
        self._prompts: OrderedDict[bytes, _Prompt] = OrderedDict()
        self._tokens_reused = self._misses = 0

    def continuation(self, key: bytes, ids: list[int]) -> Optional[Continuation]:
        """The longest prompt prefix shared with the last prompt about this image, or None."""
        prompt = self._prompts.get(key)
        shared = 0
        if prompt is not None:
            shared = next((i for i, (old, new) in enumerate(zip(prompt.ids, ids)) if old != new),
                          min(len(prompt.ids), len(ids)))
            shared = min(shared, len(ids) - 1)   # at least one token must be fed to get the first logits
        if shared == 0:
            self._misses += 1
            return None
        cache = copy.deepcopy(prompt.cache)
        if shared < len(prompt.ids):
            cache.crop(shared - len(prompt.ids))   # a negative count: drop that many tokens from the end
        self._prompts.move_to_end(key)
        self._tokens_reused += shared
        return Continuation(cache, prompt.rope_deltas.clone())

    def store(self, key: bytes, ids: list[int], cache: Any, rope_deltas: torch.Tensor) -> None:
        """Keeps the prompt's part of a finished call's cache (copied out, so the answer's tokens are freed) and
        the rope offset the model used for it."""
        for layer in cache.layers:
            layer.keys = layer.keys[..., : len(ids), :].clone()
            layer.values = layer.values[..., : len(ids), :].clone()
        self._prompts[key] = _Prompt(ids, cache, rope_deltas.clone())
        self._prompts.move_to_end(key)
        while len(self._prompts) > self._kept:
            self._prompts.popitem(last=False)

    def stats(self) -> CacheStats:
        """hits counts prompt tokens not prefilled again."""
        return CacheStats(entries=len(self._prompts), hits=self._tokens_reused, misses=self._misses)

    def clear(self) -> None:
        self._prompts.clear()


def _vision_tower(model: Any) -> torch.nn.Module:
    """Qwen2.5-VL's vision tower: model.model.visual since transformers 4.52, model.visual before."""
    inner = getattr(model, "model", None)
    tower = getattr(inner, "visual", None) if inner is not None else None
    return tower if tower is not None else model.visual


def image_key(image: Any) -> bytes:
    """Tells images apart by their pixels: SHA-256 runs in hardware on x86, far below a vision tower's cost (the
    figure: bench/README.md)."""
    pixels = np.ascontiguousarray(image)
    return hashlib.sha256(pixels.data).digest() + repr((pixels.shape, pixels.dtype.str)).encode()


class LetterTokens:
    """The tokenizer's single tokens that write an option letter, by the run of the answer tag before them, and each
    token's text (decoded once, on first sight)."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._pieces: dict[int, str] = {}
        self._by_run: dict[str, tuple[list[int], list[tuple[int, int]]]] = {}
        self._indices: dict[tuple[str, torch.device], torch.Tensor] = {}

    def piece(self, token: int) -> str:
        text = self._pieces.get(token)
        if text is None:
            text = self._pieces[token] = self._tokenizer.decode([token])
        return text

    def segments(self, run: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Every letter's token ids after `run`, concatenated A..Z, and each letter's (start, end) in that list."""
        if run not in self._by_run:
            ids: list[int] = []
            spans = []
            for index in range(26):
                start = len(ids)
                for form in LETTER_FORMS:
                    piece = (">" if not run else "") + form + option_letter(index)
                    encoded = self._tokenizer.encode(piece, add_special_tokens=False)
                    if (len(encoded) == 1 and encoded[0] not in ids[start:] and self.piece(encoded[0]) == piece
                            and letter_written(run, piece)):
                        ids.append(encoded[0])
                spans.append((start, len(ids)))
            self._by_run[run] = (ids, spans)
        return self._by_run[run]

    def ids(self, run: str) -> list[int]:
        return self.segments(run)[0]

    def index(self, run: str, device: torch.device) -> torch.Tensor:
        """ids(run) as an index tensor on `device`, made once (not one host-to-device copy per step)."""
        key = (run, device)
        tensor = self._indices.get(key)
        if tensor is None:
            tensor = self._indices[key] = torch.tensor(self.ids(run), dtype=torch.long, device=device)
        return tensor

    def probabilities(self, run: str, logits: list[float], count: int) -> tuple[tuple[float, ...], str]:
        """The first `count` letters' probabilities, renormalised over them, from the scores of ids(run)."""
        spans = self.segments(run)[1][:count]
        if any(start == end for start, end in spans):
            missing = [option_letter(i) for i, (start, end) in enumerate(spans) if start == end]
            return (), f"the tokenizer has no single token for option letter(s) {', '.join(missing)}"
        top = max(logits[: spans[-1][1]])   # scores are logits: shift by the largest before exponentiating
        if not math.isfinite(top):
            return (), "every offered option letter had zero probability at the letter position"
        masses = [math.fsum(math.exp(v - top) for v in logits[start:end]) for start, end in spans]
        return renormalised(masses), ""


@dataclass(frozen=True)
class _LetterRecord:
    step: int                   # generated tokens before the letter position
    run: str                    # the answer tag's text before it (see LetterPosition)
    logits: torch.Tensor        # the step's scores of LetterTokens.ids(run)


class LetterProbe:
    """Keeps, for each probed row, the scores of the option-letter tokens at its answer's letter position
    (LetterPosition); nothing else (no per-step scores over the vocabulary).

    It hooks into generate twice. `token_follower` (a StoppingCriteria that never stops) feeds each row's new token
    to its LetterPosition: generate calls it right before it reads its own stop flag from the device, so reading
    the new tokens there adds no wait for the device of its own (a logits processor reading them would wait for
    the step's forward pass before the step's sampling could be queued). `scores_reader` (a LogitsProcessor, first
    in the list) gathers a few dozen scores, without leaving the device, at the steps that may be the letter's."""

    def __init__(self, letters: LetterTokens, rows: list[int], prompt_length: int):
        self.letters = letters
        self.prompt_length = prompt_length
        self.records: dict[int, _LetterRecord] = {}
        self._positions = {row: LetterPosition() for row in rows}
        self._looking = list(rows)
        self.scores_reader = _LetterScores(self)
        self.token_follower = _LetterTokensFollowed(self)

    def follow(self, input_ids: torch.Tensor) -> None:
        """Feeds the token just appended to every row still looking for its letter position."""
        if not self._looking:
            return
        last = input_ids[:, -1].tolist()
        for row in list(self._looking):
            position = self._positions[row]
            position.feed(self.letters.piece(last[row]))
            if position.found:
                self._looking.remove(row)
            elif position.run is None:
                self.records.pop(row, None)   # "<answer" began another word

    def read(self, input_ids: torch.Tensor, scores: torch.Tensor) -> None:
        """Keeps the letter tokens' scores of the rows whose next token may write their letter."""
        step = input_ids.shape[1] - self.prompt_length
        for row in self._looking:
            run = self._positions[row].run
            if run is not None:
                ids = self.letters.index(run, scores.device)
                self.records[row] = _LetterRecord(step, run, scores[row, ids].float())


class _LetterScores(LogitsProcessor):
    """LetterProbe's hook before each token is chosen."""

    def __init__(self, probe: LetterProbe):
        self._probe = probe

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._probe.read(input_ids, scores)
        return scores

    # generate's LogitsProcessorList inspects every processor's signature at every step; a stored one is found
    # at once (inspect.signature returns __signature__), which cuts that per-step cost (bench/README.md)
    __call__.__signature__ = inspect.signature(__call__)   # type: ignore[attr-defined]


class _LetterTokensFollowed(StoppingCriteria):
    """LetterProbe's hook after each token is appended; it never stops a row."""

    def __init__(self, probe: LetterProbe):
        self._probe = probe
        self._never: Optional[torch.Tensor] = None   # the batch's "no row stops", made once per generate call

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        self._probe.follow(input_ids)
        if self._never is None:
            self._never = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return self._never


class _FirstScores(LogitsProcessor):
    """The first step's scores of some token ids (row 0)."""

    def __init__(self, ids: torch.Tensor):
        self._ids = ids
        self.logits: Optional[torch.Tensor] = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.logits is None:
            self.logits = scores[0, self._ids].float()
        return scores


class _SceneStop(StoppingCriteria):
    """Stops each scene-only row once its decoded text holds "</scene>"; the other rows of the batch go on.

    transformers ANDs the returned per-row flags into its unfinished-rows mask, so a stopped row only gets padding.
    The tag is found in decoded text because tokenizers split it differently in different contexts.
    """

    def __init__(self, tokenizer: Any, rows: list[int], prompt_length: int):
        self._tokenizer = tokenizer
        self._rows = rows
        self._prompt_length = prompt_length
        self.stopped_at: dict[int, int] = {}   # row -> generated tokens, the one completing the tag included

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self._prompt_length
        # only generated tokens: the prompt itself names the "<scene> </scene>" tags
        tails = input_ids[self._rows, input_ids.shape[1] - min(generated, _SCENE_TAIL_TOKENS):].tolist()
        for row, tail in zip(self._rows, tails):
            if row not in self.stopped_at and SCENE_END_TAG in self._tokenizer.decode(tail):
                self.stopped_at[row] = generated
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        done[list(self.stopped_at)] = True
        return done


class _RowStreamer(BaseStreamer):
    """Hands each streaming row its growing text; `generate` pushes one token per row per step.

    A row ends at its first end/pad token: transformers pads rows that hit EOS or were stopped by `_SceneStop`.
    """

    def __init__(self, tokenizer: Any, callbacks: list[Optional[Callable[[str, int], None]]], end_ids: set[int]):
        self._tokenizer = tokenizer
        self._sinks = [TextSink(callback) for callback in callbacks]
        self._ids: list[list[int]] = [[] for _ in callbacks]
        self._ended = [callback is None for callback in callbacks]
        self._end_ids = end_ids

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1:   # the prompt, pushed once before the first step
            return
        for row, token in enumerate(value.tolist()):
            if self._ended[row]:
                continue
            if token in self._end_ids:
                self._ended[row] = True
                continue
            ids = self._ids[row]
            ids.append(token)
            if len(ids) % _STREAM_EVERY_TOKENS == 0 or ">" in self._tokenizer.convert_ids_to_tokens(token):
                text = self._tokenizer.decode(ids, skip_special_tokens=True)
                self._sinks[row](text.rstrip("\ufffd"), len(ids))   # drop a half-decoded multi-byte character

    def end(self) -> None:
        """Nothing to flush: `finish` sends each row its exact final text once it is known."""

    def finish(self, row: int, text: str, tokens: int) -> None:
        self._sinks[row](text, tokens)


def _count_through_eos(ids: list[int], eos_ids: set[int]) -> int:
    return next((index + 1 for index, token in enumerate(ids) if token in eos_ids), len(ids))


def _token_ids(value: Union[int, list[int], None]) -> set[int]:
    if value is None:
        return set()
    return {value} if isinstance(value, int) else set(value)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendError(BackendErrorKind.UNAVAILABLE, f"device {device!r} was asked for but CUDA is not available")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise BackendError(
                BackendErrorKind.UNAVAILABLE,
                f"device {device!r} was asked for but only {torch.cuda.device_count()} CUDA device(s) exist",
            )
    return resolved


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _resolve_attention(name: str, device: torch.device, dtype: torch.dtype) -> str:
    if name != "auto":
        return name
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa"


def _load(config: TransformersConfig, device: torch.device, dtype: torch.dtype, attention: str) -> tuple[Any, Any]:
    source = _model_source(config.model)
    quantization = _quantization_config(config.quantization, device, dtype)
    try:
        model_config = AutoConfig.from_pretrained(source, local_files_only=config.local_files_only)
    except Exception as exc:
        raise BackendError(
            BackendErrorKind.UNAVAILABLE,
            f"cannot load model {config.model!r} (not a checkpoint directory, and not a hub id that is cached or "
            f"downloadable here): {_describe(exc)}",
        ) from exc
    if model_config.model_type != "qwen2_5_vl":
        raise BackendError(
            BackendErrorKind.UNAVAILABLE,
            f"model {config.model!r} is not a Qwen2.5-VL checkpoint (model_type {model_config.model_type!r})",
        )
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            source,
            config=model_config,
            attn_implementation=attention,
            device_map={"": str(device)},
            quantization_config=quantization,
            local_files_only=config.local_files_only,
            **{_DTYPE_ARG: dtype},
        )
        processor = AutoProcessor.from_pretrained(source, local_files_only=config.local_files_only)
    except Exception as exc:
        raise BackendError(BackendErrorKind.UNAVAILABLE, f"cannot load model {config.model!r}: {_describe(exc)}") from exc
    return model.eval(), processor


def _model_source(model: str) -> str:
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists() or model.startswith(("/", ".", "~")):
        raise BackendError(BackendErrorKind.UNAVAILABLE, f"model directory {model!r} does not exist")
    return model


def _quantization_config(name: str, device: torch.device, dtype: torch.dtype) -> Any:
    if name == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise BackendError(
            BackendErrorKind.UNAVAILABLE, f"quantization {name!r} needs the bitsandbytes package (pip install bitsandbytes)"
        )
    if device.type != "cuda":
        raise BackendError(BackendErrorKind.UNAVAILABLE, f"quantization {name!r} needs a CUDA device, not {device}")
    from transformers import BitsAndBytesConfig

    if name == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def _image_size_kwargs(image_processor: Any, config: TransformersConfig) -> dict[str, Any]:
    """Pixel limits as a per-call `size`, the one form transformers 4.5x and 5.x both honour.

    (5.x ignores a `size` given to from_pretrained when the checkpoint's preprocessor_config names min/max_pixels.)
    """
    if config.min_pixels is None and config.max_pixels is None:
        return {}
    loaded = image_processor.size
    return {
        "size": {
            "shortest_edge": config.min_pixels or loaded["shortest_edge"],
            "longest_edge": config.max_pixels or loaded["longest_edge"],
        }
    }


def _generate_kwargs(generation: GenerationConfig, compile: bool) -> dict[str, Any]:
    """Our GenerationConfig is the whole sampling spec: unset the checkpoint's own temperature/top_p/top_k."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": generation.max_new_tokens,
        "do_sample": generation.do_sample,
        "temperature": generation.temperature if generation.do_sample else None,
        "top_p": generation.top_p if generation.do_sample else None,
        "top_k": None,
    }
    if generation.min_new_tokens:
        kwargs["min_new_tokens"] = generation.min_new_tokens
    if compile:
        kwargs["cache_implementation"] = "static"
    return kwargs


def _describe(exc: BaseException) -> str:
    return excerpt(exc, 400) or type(exc).__name__
