"""A weight-free stand-in for SpatialThinker-7B that times like it: the real Qwen2.5-VL-7B shape, random weights,
and a processor whose tokenizer puts Qwen's special tokens at the real ids (image 151655, <|im_end|> 151645, ...).

Speed does not depend on weight values, so a randomly initialised Qwen2_5_VLForConditionalGeneration with the
7B configuration prefills and decodes like the real model when the output length is forced. What needs care is
the processor: the tiny checkpoint's tokenizer has a ~500-token vocabulary with the vision tokens at ids 9-13,
which cannot drive a 152,064-row embedding the way the real one does. So the tokenizer here is a byte-level BPE
trained on SpatialThinker-style text (so prompts tokenise to about as many tokens as with Qwen's tokenizer),
padded with never-produced filler entries up to id 151642, followed by Qwen's special tokens in Qwen's order:
every id the model and the processor agree on is the real one. The image processor is Qwen2.5-VL's default
(Qwen2VLImageProcessor, min_pixels 3136, max_pixels 12845056, CLIP mean/std), which the 7B checkpoints ship.

ROS-free: imports torch, transformers, tokenizers and the package's ROS-free modules only.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from spatialthinker_ros.core.backends.transformers.loading import DTYPE_ARG
from spatialthinker_ros.core.prompt import MODEL_CARD_INSTRUCTION
from spatialthinker_ros.tiny_checkpoint import CHAT_TEMPLATE   # ROS-free (setup.py ships it with the core)

# Qwen2.5-VL's added tokens from id 151643 on, in Qwen's order (tokenizer_config.json of Qwen2.5-VL-7B-Instruct).
QWEN_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
FIRST_ADDED_ID = 151643
REAL_IDS = {"<|endoftext|>": 151643, "<|im_end|>": 151645, "<|vision_start|>": 151652, "<|vision_end|>": 151653,
            "<|image_pad|>": 151655, "<|video_pad|>": 151656}
VOCAB_SIZE = 152064

# The model card's example answer (SpatialThinker-7B model card, "Example Output"), used as the forced output
# when scene-only and streaming are measured.
CARD_EXAMPLE_RESPONSE = (
    "<observe>\nThe image shows a living room with a couch, a coffee table, and a cat sitting on the floor.\n"
    "</observe>\n<scene>\n{\n  \"objects\": [\n    {\"id\": \"couch.1\", \"bbox\": [50, 100, 400, 350]},\n"
    "    {\"id\": \"cat.1\", \"bbox\": [200, 300, 280, 400]},\n    {\"id\": \"table.1\", \"bbox\": [150, 250, 350, 320]}\n"
    "  ],\n  \"relationships\": [\n    {\"subject\": \"cat.1\", \"predicate\": \"in front of\", \"object\": \"couch.1\"},\n"
    "    {\"subject\": \"cat.1\", \"predicate\": \"beside\", \"object\": \"table.1\"}\n  ]\n}\n</scene>\n<think>\n"
    "Looking at the scene graph, the cat is positioned in front of the couch and beside the coffee table. The "
    "bounding box coordinates show the cat is at y=300-400 while the couch extends to y=350, confirming the cat "
    "is on the floor in front of the couch.\n</think>\n<answer> (B) in front of the couch </answer>"
)

# A short answer in the same format, for quick plumbing checks.
SHORT_RESPONSE = ('<observe> a cup </observe> <scene> {"objects": [{"id": "cup.1", "bbox": [1, 2, 30, 40]}]} </scene> '
                  '<think> x </think> <answer> (A) </answer>')

# Text the BPE learns from. With Qwen's pre-tokenizer split and a 1000-entry vocabulary, the model card prompt
# (640x480, four options) tokenises to ~145 tokens and the example answer to ~270, digits one by one as Qwen does.
_CORPUS = (
    MODEL_CARD_INSTRUCTION,
    CARD_EXAMPLE_RESPONSE,
    "Image size: 640 x 480", "Image size: 1280 x 720", "Image size: 1920 x 1080",
    "Where is the cat relative to the couch? (A) on top of (B) in front of (C) behind (D) beside",
    "Is the cup left or right of the plate? Which object is closer to the camera? How many chairs are there?",
    "The robot arm can reach the mug on the shelf above the sink near the door, under the lamp, on top of the desk.",
    "The image shows a kitchen table with a red cup, a white plate and a wooden chair in a living room.",
    "Looking at the scene graph, the object is positioned in front of the other one and beside the table.",
    '{"objects": [{"id": "cup.1", "bbox": [120, 200, 180, 280]}], "relationships": '
    '[{"subject": "cup.1", "predicate": "left of", "object": "plate.1"}]}',
    "<observe> </observe> <scene> </scene> <think> </think> <answer> </answer>",
)

# Real 7B shape (tiny-model.md); the tiny shape is the tiny checkpoint's (spatialthinker_ros/tiny_checkpoint.py).
SHAPES = {
    "7b": dict(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, mrope_section=[16, 24, 24], max_position_embeddings=128000),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                    fullatt_block_indexes=[7, 15, 23, 31]),
    ),
    "tiny": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[2, 3, 3], max_position_embeddings=4096),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                    fullatt_block_indexes=[1]),
    ),
}

# Qwen2's pre-tokenizer split (its tokenizer.json): single digits, words with a leading space, punctuation runs.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")


def build_tokenizer(bpe_vocab: int = 1000):
    """Byte-level BPE with Qwen2.5-VL's added tokens at their real ids (151643 on)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    def qwen_pre_tokenizer():
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = qwen_pre_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    trained.train_from_iterator(_CORPUS, trainer=trainer)
    model = json.loads(trained.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    # Fillers: byte-level strings no merge produces (three spaces and a tilde), so they are never emitted by
    # encoding but decode to text when a random model generates them, as real vocabulary entries would.
    next_id = len(vocab)
    while next_id < FIRST_ADDED_ID:
        filler = f"ĠĠĠ~{next_id}"
        if filler not in vocab:
            vocab[filler] = next_id
            next_id += 1
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = qwen_pre_tokenizer()
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_ADDED_TOKENS])
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        padding_side="left", additional_special_tokens=list(QWEN_ADDED_TOKENS[1:14]), chat_template=CHAT_TEMPLATE,
    )
    for token, expected in REAL_IDS.items():
        actual = tokenizer.convert_tokens_to_ids(token)
        if actual != expected:
            raise RuntimeError(f"{token} got id {actual}, the real tokenizer has {expected}")
    return tokenizer


def model_config(shape: str, dtype: torch.dtype):
    from transformers import Qwen2_5_VLConfig

    text, vision = SHAPES[shape]["text"], SHAPES[shape]["vision"]
    config = Qwen2_5_VLConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        num_hidden_layers=text["num_hidden_layers"],
        num_attention_heads=text["num_attention_heads"],
        num_key_value_heads=text["num_key_value_heads"],
        max_position_embeddings=text["max_position_embeddings"],
        rope_scaling={"type": "mrope", "mrope_section": text["mrope_section"]},
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151645,
        pad_token_id=151643,
        image_token_id=REAL_IDS["<|image_pad|>"],
        video_token_id=REAL_IDS["<|video_pad|>"],
        vision_start_token_id=REAL_IDS["<|vision_start|>"],
        vision_end_token_id=REAL_IDS["<|vision_end|>"],
        vision_config=dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           hidden_act="silu", tokens_per_second=2, in_channels=3, **vision),
        **{DTYPE_ARG: dtype},
    )
    return config


def build_model(shape: str, device: str, dtype: torch.dtype, attn_implementation: str = "sdpa"):
    """Random weights initialised directly on `device` (no CPU copy, no meta-device buffers to rebuild)."""
    from transformers import AutoModelForImageTextToText, GenerationConfig

    config = model_config(shape, dtype)
    torch.manual_seed(0)
    with torch.device(device):   # a Qwen2_5_VLForConditionalGeneration
        model = AutoModelForImageTextToText.from_config(
            config, attn_implementation=attn_implementation, **{DTYPE_ARG: dtype})
    # SpatialThinker-7B's generation_config.json: {"eos_token_id": 151645, "pad_token_id": 151643} (greedy).
    model.generation_config = GenerationConfig(eos_token_id=151645, pad_token_id=151643, bos_token_id=151643)
    return model.eval()


def write_processor(directory: Path, tokenizer, config) -> Path:
    """A checkpoint-style directory holding everything but weights; AutoProcessor.from_pretrained reads it."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    config.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "min_pixels": 3136, "max_pixels": 12845056,
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}, indent=2))
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
    return directory


def build_speed_model(shape: str, device: str, dtype: torch.dtype, attn_implementation: str = "sdpa",
                      directory: Path | None = None) -> tuple[Any, Any]:
    """(model, processor) of the given shape with the real token ids."""
    from transformers import AutoProcessor

    directory = directory or Path(tempfile.mkdtemp(prefix="speed-qwen25vl-"))
    tokenizer = build_tokenizer()
    model = build_model(shape, device, dtype, attn_implementation)
    write_processor(directory, tokenizer, model.config)
    processor = AutoProcessor.from_pretrained(directory, local_files_only=True)
    return model, processor


def decode_weight_bytes(model) -> tuple[int, int]:
    """(bytes read per decoded token, all parameter bytes): every language-model weight plus lm_head, but not the
    vision tower (not run while decoding) nor the input embedding table (one row per token is read)."""
    total = per_token = 0
    for name, parameter in model.named_parameters():
        size = parameter.numel() * parameter.element_size()
        total += size
        if "visual" in name or "embed_tokens" in name:
            continue
        per_token += size
    return per_token, total
