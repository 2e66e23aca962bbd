"""The tiny random checkpoint is a faithful, deterministic, offline stand-in for a Qwen2.5-VL checkpoint."""

import importlib.metadata
import json
from pathlib import Path

import pytest

from spatialthinker_ros.tiny_checkpoint import MAX_PIXELS, build_tiny_checkpoint, main

pytestmark = pytest.mark.timeout(120)
VOCABULARY = "b2b1b8dfb5cc"   # the first digits of the pinned qwen.tiktoken's sha256


def test_checkpoint_has_the_tiny_qwen25vl_shape(tiny_checkpoint: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_checkpoint, local_files_only=True)
    assert config.model_type == "qwen2_5_vl"
    assert config.architectures == ["Qwen2_5_VLForConditionalGeneration"]
    text = config.text_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (64, 128, 2)
    assert (text.num_attention_heads, text.num_key_value_heads) == (4, 2)
    assert text.vocab_size == 152064     # Qwen2.5-VL's embedding rows
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

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the cup?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Where is the cup?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


# Qwen2.5-VL's added tokens (its tokenizer_config.json) and Qwen2.5 encodings of ordinary text.
QWEN_SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                    "<|object_ref_start|>": 151646, "<|box_start|>": 151648, "<|quad_end|>": 151651,
                    "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
                    "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657, "<|file_sep|>": 151664}
QWEN_ENCODINGS = {
    "Hello": [9707], " (": [320], "(A": [4346], ">(": [2235], " A": [362],
    "<|im_start|>user\n": [151644, 872, 198],
    "<answer> (B) the red cup </answer>": [27, 9217, 29, 320, 33, 8, 279, 2518, 10525, 690, 9217, 29],
    "<answer>B</answer>": [27, 9217, 36721, 522, 9217, 29],
    "<answer>\n(C) left of the plate": [27, 9217, 397, 3025, 8, 2115, 315, 279, 11968],
    "<answer>(A)</answer>": [27, 9217, 2235, 32, 12533, 9217, 29],
}


def test_the_tokenizer_is_qwen25s(tiny_checkpoint: Path):
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint, local_files_only=True)
    assert len(tokenizer) == 151665
    assert AutoConfig.from_pretrained(tiny_checkpoint, local_files_only=True).text_config.vocab_size == 152064
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_IDS} == QWEN_SPECIAL_IDS
    assert {text: tokenizer.encode(text, add_special_tokens=False) for text in QWEN_ENCODINGS} == QWEN_ENCODINGS
    # every option letter is one token alone and after " ", "(" and ">"; " (L" is not one token
    for letter in "ABCDEFGHIJ":
        for form in ("", " ", "(", ">"):
            assert len(tokenizer.encode(form + letter, add_special_tokens=False)) == 1, form + letter
        assert len(tokenizer.encode(" (" + letter, add_special_tokens=False)) == 2
    assert tokenizer.encode("e\u0301", add_special_tokens=False) == tokenizer.encode("\u00e9", add_special_tokens=False)


def test_the_vocabulary_comes_from_the_pinned_package(tiny_checkpoint: Path, monkeypatch):
    from spatialthinker_ros import tiny_checkpoint as module

    assert module.qwen_ranks_file().name == "qwen.tiktoken"
    monkeypatch.setattr(module, "_RANKS_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="not Qwen's vocabulary as pinned"):
        module.qwen_ranks_file()


def test_build_is_deterministic_and_reuses_a_complete_directory(tmp_path: Path):
    first = build_tiny_checkpoint(tmp_path / "a")
    second = build_tiny_checkpoint(tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    weights = first / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_tiny_checkpoint(first) == first
    assert weights.stat().st_mtime_ns == stamp     # reused, not rebuilt


@pytest.mark.parametrize("marker", [None, "4.51.0 mlp_width=128 vocabulary=VOCAB\n",
                                    "VERSION mlp_width=64 vocabulary=VOCAB\n", "VERSION mlp_width=128\n"],
                         ids=["interrupted", "other-transformers", "other-size", "other-vocabulary"])
def test_an_incomplete_or_foreign_build_is_redone(tmp_path: Path, marker):
    directory = build_tiny_checkpoint(tmp_path / "ckpt")
    if marker is None:
        (directory / "tiny-checkpoint-complete").unlink()
    else:
        (directory / "tiny-checkpoint-complete").write_text(
            marker.replace("VERSION", importlib.metadata.version("transformers")).replace("VOCAB", VOCABULARY))
    (directory / "model.safetensors").write_bytes(b"truncated")
    build_tiny_checkpoint(directory)
    assert (directory / "model.safetensors").stat().st_size > 500_000
    expected = f"{importlib.metadata.version('transformers')} mlp_width=128 vocabulary={VOCABULARY}"
    assert (directory / "tiny-checkpoint-complete").read_text().strip() == expected


def test_cli_builds_and_prints_the_directory(tmp_path: Path, capsys):
    main([str(tmp_path / "cli")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert (tmp_path / "cli" / "tiny-checkpoint-complete").is_file()
