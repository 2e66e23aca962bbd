"""What reading option probabilities costs an answer: the same request, forced to the same length, with options
(the letter probe follows every generated token) and without (no probe), on the tiny checkpoint on the CPU.

    python -m bench.option_probabilities [--new-tokens 64] [--repeats 15] [--batch 1] [--json FILE]

Runs alternate (with, without, with, ...) so load on the machine hits both alike; the report is the ratio of the
medians, measured in one run. On a shared machine that end-to-end difference is within the noise, so the probe is
also timed alone: LetterProbe called step by step on a growing answer that ends "<answer> (B)" (first sight of
every token, so its decode is not yet remembered), against the answer's measured time per token. The tiny model's
decode step is far cheaper than the 7B's, so both shares here bound the probe's share on a GPU with the real
model from above (its cost per step does not grow with the model).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench._common import machine, write_results
from spatialthinker_ros.core.backends.base import GenerationConfig
from spatialthinker_ros.core.backends.settings import TransformersConfig
from spatialthinker_ros.core.backends.transformers_backend import LetterProbe, LetterTokens, TransformersBackend
from spatialthinker_ros.core.prompt import Question
from spatialthinker_ros.core.types import InferenceRequest
from spatialthinker_ros.tiny_checkpoint import build_tiny_checkpoint

QUESTION = "Where is the cup relative to the plate?"
OPTIONS = ("left of", "right of", "behind", "in front of")


def probe_us_per_step(tokenizer, new_tokens: int, repeats: int) -> float:
    """LetterProbe's own time per generated token on one row, with a fresh LetterTokens each run."""
    answer = tokenizer.encode("<observe> a cup </observe> <answer> (B) right of </answer>", add_special_tokens=False)
    rng = np.random.default_rng(1)
    filler = rng.integers(0, len(tokenizer) - 64, max(new_tokens - len(answer), 0)).tolist()
    ids = torch.tensor([[0] * 8 + filler + answer])
    scores = torch.zeros(1, len(tokenizer))
    best = float("inf")
    for _ in range(max(repeats, 1)):
        probe = LetterProbe(LetterTokens(tokenizer), [0], prompt_length=8)
        started = time.perf_counter()
        for end in range(8, ids.shape[1] + 1):
            probe(ids[:, :end], scores)
        best = min(best, (time.perf_counter() - started) / (ids.shape[1] - 7))
    assert 0 in probe.records, "the probe found the letter"
    return best * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64, help="forced answer length")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs of each kind")
    parser.add_argument("--batch", type=int, default=1, help="requests per generate call")
    parser.add_argument("--json", help="result file (default bench/results/option_probabilities.json)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = build_tiny_checkpoint(Path(scratch) / "tiny")
        generation = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        backend = TransformersBackend(TransformersConfig(model=str(checkpoint), device="cpu", max_pixels=None,
                                                         generation=generation))
        image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
        prompt = f"Image size: 640 x 480\n\n{QUESTION}"

        def requests(options: tuple[str, ...]) -> list[InferenceRequest]:
            return [InferenceRequest(image=image, prompt=prompt, question=QUESTION, asked=Question(QUESTION, options))
                    for _ in range(args.batch)]

        kinds = {"with_options": requests(OPTIONS), "free_form": requests(())}
        seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
        for kind, batch in kinds.items():   # warm-up
            backend.generate(batch)
        for _ in range(args.repeats):
            for kind, batch in kinds.items():
                backend.forget()            # every run prefills its whole prompt
                started = time.perf_counter()
                results = backend.generate(batch)
                seconds[kind].append(time.perf_counter() - started)
                assert all(r.completion_tokens == args.new_tokens for r in results), results
        probe_us = probe_us_per_step(backend.processor.tokenizer, args.new_tokens, args.repeats)
        backend.close()
    medians = {kind: statistics.median(values) for kind, values in seconds.items()}
    report = {
        "machine": machine(), "model": "tiny checkpoint (CPU, fp32)", "new_tokens": args.new_tokens,
        "batch": args.batch, "repeats": args.repeats,
        "median_ms": {kind: round(value * 1000, 3) for kind, value in medians.items()},
        "probe_share_of_answer": medians["with_options"] / medians["free_form"] - 1,
        "probe_us_per_token_per_row": (medians["with_options"] - medians["free_form"]) * 1e6
                                      / (args.new_tokens * args.batch),
        "probe_alone_us_per_step": probe_us,
        "probe_alone_share_of_answer": probe_us * 1e-6 * args.new_tokens / medians["free_form"],
    }
    write_results("option_probabilities", report, args.json)
    print(f"median answer: {report['median_ms']['with_options']:.1f} ms with options, "
          f"{report['median_ms']['free_form']:.1f} ms free-form; probe share {report['probe_share_of_answer']:+.2%} "
          f"({report['probe_us_per_token_per_row']:+.1f} us per token per row); probe alone {probe_us:.1f} us per "
          f"step = {report['probe_alone_share_of_answer']:.2%} of the answer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
