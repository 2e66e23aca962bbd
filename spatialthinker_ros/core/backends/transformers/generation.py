"""TransformersBackend: one batched generate per call, with the caches, the letter probe, streaming and the scene
stop hooked into it."""

from __future__ import annotations

import gc
import logging
import time
from typing import Any, Callable, Optional, Sequence, Union

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteriaList
from transformers.modeling_outputs import BaseModelOutputWithPooling

from spatialthinker_ros.core.backends.base import GenerationConfig, cut_after_scene_end
from spatialthinker_ros.core.backends.settings import TransformersConfig
from spatialthinker_ros.core.backends.transformers.image_cache import CacheStats, ImageEncodingCache, image_key
from spatialthinker_ros.core.backends.transformers.letters import LetterReader, LetterStats
from spatialthinker_ros.core.backends.transformers.loading import (CACHE, NEUTRAL_DECODING, PRECOMPUTED_IMAGES,
                                                                   PROMPT_REUSE, describe, image_size_kwargs, load,
                                                                   resolve_attention, resolve_device, resolve_dtype,
                                                                   vision_tower)
from spatialthinker_ros.core.backends.transformers.prompt_cache import PromptCache
from spatialthinker_ros.core.backends.transformers.scene_stop import SceneStop
from spatialthinker_ros.core.backends.transformers.streaming import RowStreamer
from spatialthinker_ros.core.types import BackendError, BackendErrorKind, InferenceRequest, InferenceResult

log = logging.getLogger(__name__)

# Vision-tower outputs kept for follow-up questions about a recent image (memory per entry: bench/README.md).
ENCODINGS_KEPT = 4
# Prompt KV caches kept for follow-up questions (memory per entry: bench/README.md).
PROMPTS_KEPT = 4


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
        self._device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, self._device)
        self.attn_implementation = resolve_attention(config.attn_implementation, self._device, dtype)
        self.device = str(self._device)
        self.dtype = str(dtype).removeprefix("torch.")
        started = time.perf_counter()
        self._model, self._processor = loaded or load(config, self._device, dtype, self.attn_implementation)
        self._tokenizer = self._processor.tokenizer
        self._tokenizer.padding_side = "left"   # generation continues every row from its last column
        self._image_kwargs = image_size_kwargs(self._processor.image_processor, config)
        self._generate_kwargs = _generate_kwargs(config.generation, config.compile)
        self._make_logits_processors: Optional[Callable[[], Sequence[LogitsProcessor]]] = None
        # None where this transformers cannot take precomputed image embeddings: the tower then runs in generate
        self.image_encodings: Optional[ImageEncodingCache] = (
            ImageEncodingCache(vision_tower(self._model), ENCODINGS_KEPT) if PRECOMPUTED_IMAGES else None)
        # a static cache (compile) cannot continue from another cache
        self.prompts: Optional[PromptCache] = (
            PromptCache(PROMPTS_KEPT)
            if config.reuse_prompts and PROMPT_REUSE and PRECOMPUTED_IMAGES and not config.compile else None)
        # whether option letters can be read past generate (LetterReader): a calibration's setup records it
        self.letters_continue = PROMPT_REUSE and not config.compile
        self._letters = LetterReader(self._tokenizer, can_continue=self.letters_continue)
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
        """How many answers were probed for option letters, and how many forward steps their reading ran after
        generate."""
        return self._letters.stats()

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
        scene_stop = SceneStop(self._tokenizer, scene_rows, prompt_length) if scene_rows else None
        streamer = (
            RowStreamer(self._tokenizer, [r.on_text for r in requests], self._end_ids)
            if any(r.on_text for r in requests)
            else None
        )
        probed = {row: len(r.offered_options) for row, r in enumerate(requests) if r.offered_options and not r.scene_only}
        probe = self._letters.probe(list(probed), prompt_length) if probed else None
        keys = [image_key(r.image) for r in requests]
        # one question: continue from the KV of an earlier prompt about the same image where the two prompts agree
        prompt_ids = inputs["input_ids"][0].tolist() if self.prompts is not None and len(requests) == 1 else None
        continued = self.prompts.continuation(keys[0], prompt_ids) if prompt_ids else None
        if continued is not None:   # the image is in the kept KV; Qwen2.5-VL places what follows by its rope offset
            self._model.model.rope_deltas = continued.rope_deltas
            model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                            CACHE: continued.cache}
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
        stopped_at = scene_stop.stopped_at if scene_stop else {}
        counts, texts = [], []
        for row, ids in enumerate(output.sequences[:, prompt_length:].tolist()):
            counts.append(stopped_at.get(row) or _count_through_eos(ids, self._eos_ids))
            text = self._tokenizer.decode(ids[:counts[row]], skip_special_tokens=True)
            texts.append(cut_after_scene_end(text) if requests[row].scene_only else text)
        rope_deltas = self._model.model.rope_deltas
        readings = {row: self._letters.read(self._model, probe, row, count, texts[row], output,
                                            inputs["attention_mask"], rope_deltas)
                    for row, count in probed.items()}
        if prompt_ids:
            self.prompts.store(keys[0], prompt_ids, getattr(output, CACHE), rope_deltas)
        seconds = time.perf_counter() - started
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        results = []
        for row, (text, count) in enumerate(zip(texts, counts)):
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

    def _classify(self, exc: Exception) -> tuple[BackendErrorKind, str]:
        if isinstance(exc, torch.cuda.OutOfMemoryError) or (
            isinstance(exc, RuntimeError) and "out of memory" in str(exc)
        ):
            log.warning("out of memory in generate: %s", exc)
            return BackendErrorKind.OUT_OF_MEMORY, f"out of memory on {self.device}: {describe(exc)}"
        log.exception("generate failed")
        return BackendErrorKind.FAILED, f"generation failed: {describe(exc)}"


def _messages(prompt: str) -> list[dict[str, Any]]:
    """The model card's single user turn (image, then text); the chat template adds Qwen's default system turn."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def _count_through_eos(ids: list[int], eos_ids: set[int]) -> int:
    return next((index + 1 for index, token in enumerate(ids) if token in eos_ids), len(ids))


def _token_ids(value: Union[int, list[int], None]) -> set[int]:
    if value is None:
        return set()
    return {value} if isinstance(value, int) else set(value)


def _generate_kwargs(generation: GenerationConfig, compile: bool) -> dict[str, Any]:
    """Our GenerationConfig is the whole sampling spec: unset the checkpoint's own sampling and score processors."""
    kwargs: dict[str, Any] = {
        **NEUTRAL_DECODING,
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
