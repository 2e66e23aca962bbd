"""Forced answers: a random-weight model writes a given text through TransformersBackend's public hook
(set_logits_processors), so the benchmarks time answers of a known length and shape. ROS-free (the GPU script
imports it on machines without ROS).
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from transformers import LogitsProcessor

# What the option letter looks like right after the answer tag: "<answer> (B) ...", "<answer>B ...".
_LETTER_AFTER_TAG = re.compile(r"(<answer>)\s*\(?[A-Z]\)?")
_FILLER = " the"   # a word that is one token in both benchmark tokenizers (padding)


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


@contextmanager
def forced(backend: Any, ids: list[int], eos: int) -> Iterator[None]:
    """The backend's generate calls write the given text (a fresh ForceText per call), then decode freely again."""
    backend.set_logits_processors(lambda: [ForceText(ids, eos)])
    try:
        yield
    finally:
        backend.set_logits_processors(None)


def without_letter(text: str) -> str:
    """The answer with its option letter taken out ("<answer> (B) in front" -> "<answer> in front"): the model then
    writes no letter where the letter belongs, and the letter probe's extra step runs."""
    stripped, count = _LETTER_AFTER_TAG.subn(r"\1", text)
    if count != 1:
        raise ValueError(f"expected one option letter after <answer> in {text!r}")
    return stripped


def padded_to(tokenizer: Any, text: str, tokens: int) -> list[int]:
    """`text`'s token ids, with filler words put before its <answer> until it is exactly `tokens` long (answers of
    one length cost alike whatever their last words are)."""
    head, tag, tail = text.partition("<answer>")
    if not tag:
        raise ValueError(f"no <answer> in {text!r}")
    words = head.rstrip()
    space = head[len(words):]
    for count in range(tokens + 1):
        ids = tokenizer.encode(words + _FILLER * count + space + tag + tail, add_special_tokens=False)
        if len(ids) == tokens:
            return ids
        if len(ids) > tokens:
            break
    raise ValueError(f"{text!r} cannot be padded to exactly {tokens} tokens")
