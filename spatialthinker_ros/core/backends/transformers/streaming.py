"""Streaming each row's growing text to its request while one batched generate runs."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from transformers.generation import BaseStreamer

from spatialthinker_ros.core.backends.base import TextSink

# Streaming decodes a row's whole text; doing it every few tokens (or when a tag may have closed) bounds the cost.
_STREAM_EVERY_TOKENS = 8


class RowStreamer(BaseStreamer):
    """Hands each streaming row its growing text; `generate` pushes one token per row per step.

    A row ends at its first end/pad token: transformers pads rows that hit EOS or were stopped by `SceneStop`.
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
