"""Shortening text for error messages and logs: callers, servers and models control how long their text is."""

from __future__ import annotations

from typing import Any


def excerpt(value: Any, limit: int = 64) -> str:
    """`value` as one line (whitespace runs become one space), cut at `limit` characters with the full length said."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
