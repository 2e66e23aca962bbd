"""Which weights a model reference names: a fingerprint of a checkpoint's files, so that a calibration made on some
weights is refused on others, even at the same path or under the same hub id. ROS- and torch-free.

The fingerprint hashes config.json, each weight file's name, size and (safetensors) header, and samples of its
bytes at fixed offsets: headers alone name tensors and shapes, which a fine-tune shares with its base model, and
reading whole files would cost seconds per gigabyte. So it tells apart weights that differ throughout (a fine-tune,
another training run, another quantization), not a single edited value. A hub id is looked up in the local hub cache (the snapshot
the model was loaded from), so a local copy of the same files has the same fingerprint.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Optional

_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")
_SAMPLES = 16            # byte samples per weight file, evenly spaced
_SAMPLE_BYTES = 4096
_MAX_HEADER = 100 * 2**20


def checkpoint_fingerprint(model: str) -> str:
    """"sha256:<16 hex digits>" of the checkpoint `model` names (a directory, or a hub id in the local hub cache).
    ValueError when its files cannot be found here."""
    folder = checkpoint_folder(model)
    if folder is None:
        raise ValueError(f"cannot fingerprint model {model!r}: not a checkpoint directory, nor in the local hub cache")
    digest = hashlib.sha256()
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(f"cannot fingerprint model {model!r}: {folder} holds no config.json")
    digest.update(config.read_bytes())
    weights = sorted({path for pattern in _WEIGHT_PATTERNS for path in folder.glob(pattern)})
    if not weights:
        raise ValueError(f"cannot fingerprint model {model!r}: {folder} holds no weight files")
    for path in weights:
        digest.update(path.name.encode() + b"\0")
        digest.update(_file_summary(path))
    return "sha256:" + digest.hexdigest()[:16]


def local_checkpoint(model: str) -> Optional[Path]:
    """The directory `model` names, or None when it is a hub id ("org/name", or a legacy "name"). ValueError when it
    names a path that is not a directory: one that exists as a file, or starts with "/", "." or "~"."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith(("/", ".", "~")):
        raise ValueError(f"model directory {model!r} does not exist")
    return None


def checkpoint_folder(model: str) -> Optional[Path]:
    """The directory `model` names, or the local hub cache's snapshot of that hub id; None when neither exists."""
    try:
        folder = local_checkpoint(model)
    except ValueError:
        return None
    if folder is not None:
        return folder
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model, "config.json")
    except ValueError:   # not a valid hub id (huggingface_hub's HFValidationError)
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def _file_summary(path: Path) -> bytes:
    """Size, the safetensors header (tensor names, dtypes, shapes, offsets) and _SAMPLES evenly spaced samples."""
    size = path.stat().st_size
    parts = [str(size).encode()]
    with path.open("rb") as file:
        if path.suffix == ".safetensors" and size >= 8:
            (length,) = struct.unpack("<Q", file.read(8))
            if length <= min(size - 8, _MAX_HEADER):
                parts.append(file.read(length))
        for i in range(_SAMPLES):
            file.seek(max(0, (size - _SAMPLE_BYTES) * i // max(1, _SAMPLES - 1)))
            parts.append(file.read(_SAMPLE_BYTES))
    return b"".join(parts)
