"""SpatialThinker (any Qwen2.5-VL checkpoint) in this process with transformers: one batched generate per call.

Importing this package imports torch and transformers; `create_backend` imports it only when asked for this backend.
One module per concern: `loading` (checkpoint, device, dtype, attention; what the installed transformers can do),
`generation` (`TransformersBackend`), `image_cache` and `prompt_cache` (what follow-up questions about a frame
reuse), `letters` (the option-letter probe), `streaming` (text to each request as it grows), `scene_stop`
(scene-only rows stop at "</scene>").
"""

from spatialthinker_ros.core.backends.settings import TransformersConfig
from spatialthinker_ros.core.backends.transformers.generation import TransformersBackend
from spatialthinker_ros.core.backends.transformers.image_cache import CacheStats
from spatialthinker_ros.core.backends.transformers.letters import LetterStats

__all__ = ["TransformersBackend", "TransformersConfig", "CacheStats", "LetterStats"]
