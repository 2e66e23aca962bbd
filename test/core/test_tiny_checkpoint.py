"""The tiny random checkpoint is a faithful, deterministic, offline stand-in for a Qwen2.5-VL checkpoint."""

import importlib.metadata
import json
from pathlib import Path

import pytest

from spatialthinker_ros.tiny_checkpoint import MAX_PIXELS, build_tiny_checkpoint, main

pytestmark = pytest.mark.timeout(120)


def test_checkpoint_has_the_tiny_qwen25vl_shape(tiny_checkpoint: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_checkpoint, local_files_only=True)
    assert config.model_type == "qwen2_5_vl"
    assert config.architectures == ["Qwen2_5_VLForConditionalGeneration"]
    text = config.text_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (64, 128, 2)
    assert (text.num_attention_heads, text.num_key_value_heads) == (4, 2)
    assert text.vocab_size % 64 == 0
    vision = config.vision_config
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.out_hidden_size) == (2, 32, 2, 64)
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)
    assert list(vision.fullatt_block_indexes) == [1]
    preprocessor = json.loads((tiny_checkpoint / "preprocessor_config.json").read_text())
    assert preprocessor["max_pixels"] == MAX_PIXELS == 50176
    assert preprocessor["processor_class"] == "Qwen2_5_VLProcessor"


def test_tokenizer_and_template_speak_qwen(tiny_checkpoint: Path):
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(tiny_checkpoint, local_files_only=True)
    processor = AutoProcessor.from_pretrained(tiny_checkpoint, local_files_only=True)
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == config.image_token_id
    assert tokenizer.convert_tokens_to_ids("<|video_pad|>") == config.video_token_id
    assert tokenizer.convert_tokens_to_ids("<|vision_start|>") == config.vision_start_token_id
    assert tokenizer.convert_tokens_to_ids("<|vision_end|>") == config.vision_end_token_id
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.padding_side == "left"
    answer = '<scene> {"objects": [{"id": "cup.1", "bbox": [120, 200, 180, 280]}]} </scene>'
    assert tokenizer.decode(tokenizer.encode(answer, add_special_tokens=False)) == answer
    assert len(tokenizer.encode("<observe>", add_special_tokens=False)) <= 3   # the corpus taught it the tags

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the cup?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Where is the cup?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_build_is_deterministic_and_reuses_a_complete_directory(tmp_path: Path):
    first = build_tiny_checkpoint(tmp_path / "a")
    second = build_tiny_checkpoint(tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    weights = first / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_tiny_checkpoint(first) == first
    assert weights.stat().st_mtime_ns == stamp     # reused, not rebuilt


@pytest.mark.parametrize("marker", [None, "4.51.0 mlp_width=128\n", "VERSION mlp_width=64\n"],
                         ids=["interrupted", "other-transformers", "other-size"])
def test_an_incomplete_or_foreign_build_is_redone(tmp_path: Path, marker):
    directory = build_tiny_checkpoint(tmp_path / "ckpt")
    if marker is None:
        (directory / "tiny-checkpoint-complete").unlink()
    else:
        (directory / "tiny-checkpoint-complete").write_text(
            marker.replace("VERSION", importlib.metadata.version("transformers")))
    (directory / "model.safetensors").write_bytes(b"truncated")
    build_tiny_checkpoint(directory)
    assert (directory / "model.safetensors").stat().st_size > 500_000
    expected = f"{importlib.metadata.version('transformers')} mlp_width=128"
    assert (directory / "tiny-checkpoint-complete").read_text().strip() == expected


def test_cli_builds_and_prints_the_directory(tmp_path: Path, capsys):
    main([str(tmp_path / "cli")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert (tmp_path / "cli" / "tiny-checkpoint-complete").is_file()
