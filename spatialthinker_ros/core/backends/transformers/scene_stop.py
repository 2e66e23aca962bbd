"""Stopping scene-only rows at their "</scene>" while the rest of the batch goes on."""

from __future__ import annotations

from typing import Any

import torch
from transformers import StoppingCriteria

from spatialthinker_ros.core.backends.base import SCENE_END_TAG

# "</scene>" is 8 characters and every token holds at least one byte, so a newly completed tag lies in the last 8.
_SCENE_TAIL_TOKENS = 10


class SceneStop(StoppingCriteria):
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
