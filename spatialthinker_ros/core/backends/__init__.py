"""Backends turn prepared requests into raw model text. `create_backend` picks one by name.

A backend's module is imported only when that backend is created: only "transformers" imports torch, so the
openai and replay paths (and a ROS node using them) stay light.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Mapping

from spatialthinker_ros.core.backends.base import Backend, GenerationConfig

# name -> (module or package in this package, backend class, its config dataclass)
_BACKENDS = {
    "transformers": ("transformers", "TransformersBackend", "TransformersConfig"),
    "openai": ("openai_backend", "OpenAIBackend", "OpenAIConfig"),
    "replay": ("replay_backend", "ReplayBackend", "ReplayConfig"),
}
BACKEND_NAMES = tuple(_BACKENDS)


def create_backend(name: str, **settings: Any) -> Backend:
    """Build the named backend from its config's fields; `generation` may be a GenerationConfig or a mapping."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid names: {', '.join(BACKEND_NAMES)}")
    module_name, backend_class, config_class = _BACKENDS[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    config_type = getattr(module, config_class)
    fields = {f.name for f in dataclasses.fields(config_type)}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise ValueError(f"unknown {name} backend settings {unknown}; valid settings: {sorted(fields)}")
    if isinstance(settings.get("generation"), Mapping):
        settings["generation"] = GenerationConfig(**settings["generation"])
    return getattr(module, backend_class)(config_type(**settings))
