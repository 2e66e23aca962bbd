"""The checkpoint fingerprint (core/checkpoint.py): the same files give the same one wherever they lie (a folder, the
hub cache), other weights give another, even with the same names and shapes."""

import shutil
from pathlib import Path

import pytest

from spatialthinker_ros.core.checkpoint import checkpoint_fingerprint


def test_a_copy_has_the_same_fingerprint_and_other_weights_another(tiny_checkpoint: Path, tmp_path: Path):
    original = checkpoint_fingerprint(str(tiny_checkpoint))
    assert original.startswith("sha256:") and len(original) == len("sha256:") + 16
    copy = Path(shutil.copytree(tiny_checkpoint, tmp_path / "copy"))
    assert checkpoint_fingerprint(str(copy)) == original
    # other values in the file's second half (as a fine-tune's weights differ throughout): same size, same
    # safetensors header (names, shapes, offsets)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    half = len(data) // 2
    data[half:] = bytes(data[half:]).translate(bytes(range(255, -1, -1)))
    weights.write_bytes(bytes(data))
    assert checkpoint_fingerprint(str(copy)) != original
    (copy / "config.json").write_text((tiny_checkpoint / "config.json").read_text().replace("1e-06", "1e-05"))
    assert checkpoint_fingerprint(str(copy)) != original


@pytest.mark.parametrize("hub_id", ["org/tiny", "tiny"])   # "tiny": a legacy id without an organisation
def test_a_hub_id_is_fingerprinted_from_the_hub_cache(hub_id: str, tiny_checkpoint: Path, tmp_path: Path,
                                                      monkeypatch):
    import huggingface_hub.constants

    revision = "0" * 40
    repo = tmp_path / "hub" / ("models--" + hub_id.replace("/", "--"))
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)   # so that "tiny" names no folder here
    assert checkpoint_fingerprint(hub_id) == checkpoint_fingerprint(str(tiny_checkpoint))


@pytest.mark.parametrize("model, message", [("org/not-cached", "nor in the local hub cache"),
                                            ("a/b/c", "nor in the local hub cache"),   # not a valid hub id
                                            ("/no/such/dir", "not a checkpoint directory")])
def test_what_cannot_be_found_is_refused(model, message, tmp_path: Path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match=message):
        checkpoint_fingerprint(model)


def test_a_folder_without_weights_is_refused(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="holds no weight files"):
        checkpoint_fingerprint(str(tmp_path))


def test_a_file_is_not_a_checkpoint_directory(tmp_path: Path):
    from spatialthinker_ros.core.checkpoint import local_checkpoint

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="does not exist"):
        local_checkpoint(str(weights))
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        checkpoint_fingerprint(str(weights))
