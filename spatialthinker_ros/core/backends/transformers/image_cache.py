"""Vision-tower outputs of recent images, kept so that questions about one frame share its encoding."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class CacheStats:
    """What a cache holds now and how often it served (benchmarks and tests read it)."""

    entries: int   # kept now
    hits: int      # images not encoded again / prompt tokens not prefilled again
    misses: int    # images encoded / one-question prompts with nothing to continue from


def image_key(image: Any) -> bytes:
    """Tells images apart by their pixels: SHA-256 runs in hardware on x86, far below a vision tower's cost (the
    figure: bench/README.md)."""
    pixels = np.ascontiguousarray(image)
    return hashlib.sha256(pixels.data).digest() + repr((pixels.shape, pixels.dtype.str)).encode()


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
