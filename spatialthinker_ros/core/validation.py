"""Validation of the model reference and server URL: both come from parameters or the command line."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_MAX_PATH = 4096


def validate_model_reference(model: str) -> str:
    """A hub id ("org/name") or a filesystem path to a checkpoint folder; never a URL or control characters."""
    if not model or not model.strip():
        raise ValueError("model must not be empty")
    if len(model) > _MAX_PATH or any(ord(c) < 32 for c in model):
        raise ValueError("model must be a hub id or a path without control characters")
    if "://" in model:
        raise ValueError(f"model must be a hub id (org/name) or a local directory, not a URL: {model!r}")
    is_path = model.startswith(("/", "./", "../", "~")) or model.count("/") != 1
    if not is_path and not _HUB_ID.match(model):
        raise ValueError(f"model {model!r} is neither a hub id (org/name) nor a path")
    return model


def validate_server_url(url: str) -> str:
    """http(s)://host[:port][/path] with no credentials, query or fragment (keys go in the environment)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"server URL {url!r} is malformed: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"server URL must start with http:// or https://, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"server URL has no host: {url!r}")
    if parts.username or parts.password:
        raise ValueError("server URL must not contain credentials; put the API key in the api_key_env variable")
    if parts.query or parts.fragment:
        raise ValueError(f"server URL must not have a query or fragment: {url!r}")
    if port == 0:
        raise ValueError(f"server URL has port 0: {url!r}")
    return url.rstrip("/")
