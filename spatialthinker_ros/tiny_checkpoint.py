"""A tiny, randomly initialised Qwen2.5-VL checkpoint with Qwen2.5-VL's real tokenizer, built offline in seconds.

Its answers are noise, but loading it exercises exactly the code path of SpatialThinker-7B (config, tokenizer,
chat template, image processor, vision tower, M-RoPE, generation), so tests and the demo need no model hub. The
tokenizer is Qwen's own (its 151,643 byte-level BPE ranks from the pinned `dashscope` package, Qwen2's
pre-tokenizer, NFC, the added tokens at their real ids) and the embedding has Qwen2.5-VL's 152,064 rows, so text
splits into the very token ids the real model reads and writes; only the hidden sizes are tiny.
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import importlib.metadata
import json
from pathlib import Path

COMPLETE_MARKER = "tiny-checkpoint-complete"

# Qwen2.5-VL's added tokens, in order from id 151643 (right after the 151,643 byte-level BPE ranks): the first
# fourteen are special (never split, skipped when decoding), the rest are plain added tokens, as in its tokenizer.
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
_ADDED_TOKENS = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                 "<|repo_name|>", "<|file_sep|>")
# Qwen2.5-VL's embedding rows: the 151,665 tokens padded up, as in its config.json.
VOCAB_SIZE = 152064

# Qwen's byte-level BPE ranks (ids 0..151642), as the `dashscope` package ships them; the hash pins the content.
_RANKS_PACKAGE, _RANKS_FILE = "dashscope", "dashscope/resources/qwen.tiktoken"
_RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
_RANKS_COUNT = 151643

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


def build_tiny_checkpoint(directory: Path, mlp_width: int = 128) -> Path:
    """Build the checkpoint in `directory` (or reuse a complete one there) and return `directory`.

    The marker, written last, records the transformers version and the vocabulary: a checkpoint is only reused by
    the version that wrote it, since config and tokenizer files change format between versions. `mlp_width` makes the weights
    heavier without changing behaviour (65536 -> ~100 MB), for tests that must see memory come and go.
    """
    directory = Path(directory)
    marker = directory / COMPLETE_MARKER
    stamp = f"{importlib.metadata.version('transformers')} mlp_width={mlp_width} vocabulary={_RANKS_SHA256[:12]}"
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
        vocab_size=VOCAB_SIZE,
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


def qwen_ranks_file() -> Path:
    """Qwen's BPE ranks inside the installed `dashscope` distribution, found without importing it (its import
    pulls in its API client); RuntimeError when it is missing or not the pinned content."""
    try:
        path = Path(importlib.metadata.distribution(_RANKS_PACKAGE).locate_file(_RANKS_FILE))
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"the tiny checkpoint takes Qwen's vocabulary from the {_RANKS_PACKAGE} package: install "
                           "the pinned one (make setup, requirements/lock-*.txt)") from None
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != _RANKS_SHA256:
        raise RuntimeError(f"{path} is missing or is not Qwen's vocabulary as pinned (sha256 {_RANKS_SHA256}): "
                           f"install the {_RANKS_PACKAGE} version of requirements/lock-*.txt")
    return path


def _qwen_ranks() -> dict[bytes, int]:
    """token bytes -> rank (= id), from the tiktoken file: one `base64(bytes) rank` per line."""
    lines = qwen_ranks_file().read_bytes().splitlines()
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}
    if len(ranks) != _RANKS_COUNT or sorted(ranks.values()) != list(range(_RANKS_COUNT)):
        raise RuntimeError(f"expected ranks 0..{_RANKS_COUNT - 1} in {qwen_ranks_file()}")
    return ranks


def _merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token, in rank order, as Qwen's tokenizer.json has them (151,387): the last pair
    that byte-level BPE, merging the lowest-ranked pair first, joins on the way to that token. Most tokens split
    into two known lower-ranked tokens only one way; the others are found by running that BPE."""
    merges = []
    for token, rank in ranks.items():
        if len(token) == 1:
            continue
        splits = [(token[:i], token[i:]) for i in range(1, len(token))
                  if ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank]
        merges.append((rank, splits[0] if len(splits) == 1 else _last_pair(token, rank, ranks)))
    return [pair for _, pair in sorted(merges)]


def _last_pair(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        joined = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        best, i = min(joined)
        if best >= rank:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise RuntimeError(f"Qwen's ranks do not build token {rank} ({token!r}) from two lower-ranked tokens")
    return parts[0], parts[1]


@functools.lru_cache(maxsize=1)
def _qwen_tokenizer_json() -> str:
    """Qwen2.5-VL's tokenizer as tokenizers' JSON: its BPE ranks and merges, Qwen2's split regex (from
    transformers) then byte-level, NFC, and its added tokens from id 151643. Built once per process (seconds)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    ranks = _qwen_ranks()
    to_unicode = str.maketrans({chr(b): c for b, c in bytes_to_unicode().items()})

    def name(token: bytes) -> str:
        return token.decode("latin-1").translate(to_unicode)

    bpe = Tokenizer(models.BPE({name(t): r for t, r in ranks.items()},
                               [(name(a), name(b)) for a, b in _merges(ranks)], fuse_unk=False, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in _SPECIAL_TOKENS])
    bpe.add_tokens([AddedToken(t, normalized=False, special=False) for t in _ADDED_TOKENS])
    return bpe.to_str()


def _build_tokenizer():
    """Qwen2.5-VL's own tokenizer (vocabulary, pre-tokenizer, normaliser, added tokens), so the letters, tags and
    numbers of an answer split into exactly the tokens SpatialThinker-7B reads and writes."""
    from tokenizers import Tokenizer
    from transformers import Qwen2TokenizerFast

    return Qwen2TokenizerFast(
        tokenizer_object=Tokenizer.from_str(_qwen_tokenizer_json()),
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
