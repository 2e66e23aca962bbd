"""A tiny, randomly initialised Qwen2.5-VL checkpoint, built offline in about a second.

Its answers are noise, but loading it exercises exactly the code path of SpatialThinker-7B (config, tokenizer,
chat template, image processor, vision tower, M-RoPE, generation), so tests and the demo need no model hub.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from pathlib import Path

COMPLETE_MARKER = "tiny-checkpoint-complete"

# Qwen2.5-VL's special tokens, in Qwen's order, so the vision token ids resolve the way the real ones do.
_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2.5-VL-Instruct's template: a default system turn when the caller gives none, an image rendered as
# <|vision_start|><|image_pad|><|vision_end|> (the processor expands the pad to the image's token count).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Small pixel budget: a 640x480 image becomes 224x168 -> 48 image tokens, keeping CPU tests fast.
MAX_PIXELS = 50176
MIN_PIXELS = 3136

_CORPUS_LINES = (
    "You FIRST observe the image in <observe> </observe> tags, then visualise the relevant scene graph in "
    "<scene> </scene> tags, followed by thinking about the reasoning process as an internal monologue within "
    "<think> </think> tags and then provide the final answer. The final answer MUST BE put within <answer> "
    "</answer> tags, e.g., <answer> (A) cat </answer>.",
    "Image size: 640 x 480",
    "Where is the cup relative to the plate? (A) left of (B) right of (C) behind (D) in front of",
    "<observe> The image shows a kitchen table with a red cup, a white plate and a wooden chair. </observe>",
    '<scene> {"objects": [{"id": "cup.1", "bbox": [120, 200, 180, 280]}, '
    '{"id": "plate.1", "bbox": [300, 210, 420, 290]}, {"id": "chair.1", "bbox": [10, 150, 90, 470]}], '
    '"relationships": [{"subject": "cup.1", "predicate": "left of", "object": "plate.1"}, '
    '{"subject": "chair.1", "predicate": "behind", "object": "cup.1"}]} </scene>',
    "<think> The cup box spans x 120 to 180 and the plate box spans x 300 to 420, so the cup is to the left "
    "of the plate. </think>",
    "<answer> (A) left of </answer>",
    '<scene> {"objects": [{"id": "couch.1", "bbox": [50, 100, 400, 350]}, '
    '{"id": "cat.1", "bbox": [200, 300, 280, 400]}, {"id": "coffee_table.1", "bbox": [150, 250, 350, 320]}], '
    '"relationships": [{"subject": "cat.1", "predicate": "in front of", "object": "couch.1"}]} </scene>',
    "<answer> (B) in front of the couch </answer>",
    "Is the bottle closer to the camera than the box? How many chairs are there? Which object is larger?",
    "0 1 2 3 4 5 6 7 8 9 10 25 48 64 100 128 256 320 479 512 639 1024 1280 720 1920 1080",
    "The robot arm can reach the mug on the shelf above the sink near the door, under the lamp, on top of the desk.",
)


def build_tiny_checkpoint(directory: Path, mlp_width: int = 128) -> Path:
    """Build the checkpoint in `directory` (or reuse a complete one there) and return `directory`.

    The marker, written last, records the transformers version: a checkpoint is only reused by the version that
    wrote it, since config and tokenizer files change format between versions. `mlp_width` makes the weights
    heavier without changing behaviour (65536 -> ~100 MB), for tests that must see memory come and go.
    """
    directory = Path(directory)
    marker = directory / COMPLETE_MARKER
    stamp = f"{importlib.metadata.version('transformers')} mlp_width={mlp_width}"
    if marker.is_file() and marker.read_text().strip() == stamp:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)   # a build cut short must not pass for a finished one

    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = _build_tokenizer()
    tokenizer.save_pretrained(directory)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=64,
        intermediate_size=mlp_width,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(directory)

    (directory / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2_5_VLProcessor",
                "do_resize": True,
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "do_convert_rgb": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "min_pixels": MIN_PIXELS,
                "max_pixels": MAX_PIXELS,
                "patch_size": 14,
                "temporal_patch_size": 2,
                "merge_size": 2,
            },
            indent=2,
        )
    )
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
    marker.write_text(stamp + "\n")
    return directory


def _build_tokenizer():
    """Byte-level BPE trained on SpatialThinker-style text, so random outputs decode to tag- and JSON-like noise."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS_LINES, trainer=trainer)
    return Qwen2TokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        padding_side="left",
        additional_special_tokens=list(_SPECIAL_TOKENS[1:]),
        chat_template=CHAT_TEMPLATE,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a tiny random Qwen2.5-VL checkpoint (offline, in seconds).")
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    print(build_tiny_checkpoint(args.directory))


if __name__ == "__main__":
    main()
