"""KV caches of recent one-question prompts, so that a follow-up question about a frame prefills only its question."""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

import torch

from spatialthinker_ros.core.backends.transformers.image_cache import CacheStats


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
