"""What reading option probabilities costs an answer, on the tiny checkpoint on the CPU: one forced answer of a
fixed length, asked three ways.

    python -m bench.option_probabilities [--new-tokens 64] [--repeats 41] [--batch 1] [--json FILE]

- with options: the letter probe follows every generated token and reads the letter after "<answer>";
- free-form: the same answer without options (no probe);
- no letter: with options, the same length, but nothing where the letter belongs ("<answer> right of"), so the
  probe's extra step (one forward step from the generation's cache, the card's " (" after ">") runs too.

Runs alternate (one of each kind per round) so load on the machine hits all alike; ratios are medians of each
round's ratios, measured in one run. On a shared machine the probe's end-to-end difference is within the noise,
so the probe is also timed alone: its two hooks called step by step on a growing answer that ends "<answer> (B)",
warm (per step, against the answer's time per token) and as at a backend's first question with options (letter
tables built and every token decoded on first sight; once per backend, against the whole answer). The tiny
model's decode step is far cheaper than the 7B's, so the probe's share here bounds its share with the real model
from above (its cost per step does not grow with the model); the extra step's share does not: it is one decode
step of whichever model runs (bench/gpu_latency.py measures both on a GPU).
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
from transformers import LogitsProcessorList, StoppingCriteriaList

from bench._common import machine, write_results
from bench._forced import forced, padded_to, without_letter
from spatialthinker_ros.core.backends.base import GenerationConfig
from spatialthinker_ros.core.backends.settings import TransformersConfig
from spatialthinker_ros.core.backends.transformers import TransformersBackend
from spatialthinker_ros.core.backends.transformers.letters import LetterProbe, LetterTokens
from spatialthinker_ros.core.prompt import Question
from spatialthinker_ros.core.types import InferenceRequest
from spatialthinker_ros.tiny_checkpoint import build_tiny_checkpoint

QUESTION = "Where is the cup relative to the plate?"
OPTIONS = ("left of", "right of", "behind", "in front of")
ANSWER = "<observe> a cup </observe> <think> the cup is right of the plate </think> <answer> (B) right of </answer>"
KINDS = ("with_options", "free_form", "no_letter")


def probe_seconds(tokenizer, new_tokens: int, repeats: int, warm: bool) -> tuple[float, int]:
    """(seconds, steps): LetterProbe's own time over one row's answer: its scores hook before each token, its token
    hook after it, each called through the transformers list that generate calls it from (best of `repeats`).
    Warm: the letter tables and every token's text are remembered, as they are after a backend's first answers.
    Not warm: a fresh LetterTokens each run, as at a backend's first question with options (it builds its letter
    tables and decodes each token on first sight)."""
    answer = tokenizer.encode("<observe> a cup </observe> <answer> (B) right of </answer>", add_special_tokens=False)
    rng = np.random.default_rng(1)
    filler = rng.integers(0, len(tokenizer) - 64, max(new_tokens - len(answer), 0)).tolist()
    ids = torch.tensor([[0] * 8 + filler + answer])
    scores = torch.zeros(1, len(tokenizer))
    letters = LetterTokens(tokenizer)
    best = float("inf")
    for _ in range(max(repeats, 1) + warm):
        probe = LetterProbe(letters if warm else LetterTokens(tokenizer), [0], prompt_length=8)
        processors, criteria = LogitsProcessorList([probe.scores_reader]), StoppingCriteriaList([probe.token_follower])
        started = time.perf_counter()
        for end in range(8, ids.shape[1]):
            processors(ids[:, :end], scores)
            criteria(ids[:, :end + 1], None)
        best = min(best, time.perf_counter() - started)
        if 0 not in probe.records:
            raise RuntimeError("the probe did not find the letter")
    return best, ids.shape[1] - 8


# The runs (answer-tag text) at which the answer forms Qwen writes reach their letter: "<answer" then ">B", ">",
# "> (", ">(", ">\n", "> "
TABLE_RUNS = ("", ">", "> (", ">(", ">\n", "> ")


def letter_tables_seconds(tokenizer, repeats: int) -> float:
    """Seconds to build a fresh LetterTokens' tables for TABLE_RUNS (each letter's tokens in each form there), as
    the first answers with options do (best of `repeats`)."""
    best = float("inf")
    for _ in range(max(repeats, 1)):
        letters = LetterTokens(tokenizer)
        started = time.perf_counter()
        for run in TABLE_RUNS:
            letters.ids(run)
        best = min(best, time.perf_counter() - started)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64, help="forced answer length")
    parser.add_argument("--repeats", type=int, default=41, help="timed runs of each kind")
    parser.add_argument("--batch", type=int, default=1, help="requests per generate call")
    parser.add_argument("--json", help="result file (default bench/results/option_probabilities.json)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = build_tiny_checkpoint(Path(scratch) / "tiny")
        generation = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        backend = TransformersBackend(TransformersConfig(model=str(checkpoint), device="cpu", max_pixels=None,
                                                         generation=generation))
        tokenizer = backend.processor.tokenizer
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        scripts = {"with_options": padded_to(tokenizer, ANSWER, args.new_tokens - 1),   # then <|im_end|>
                   "no_letter": padded_to(tokenizer, without_letter(ANSWER), args.new_tokens - 1)}
        scripts["free_form"] = scripts["with_options"]
        image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
        prompt = f"Image size: 640 x 480\n\n{QUESTION}"

        def answer(kind: str) -> tuple[float, int]:
            """(seconds, extra steps) of one generate call of `kind`; every run prefills its whole prompt."""
            options = () if kind == "free_form" else OPTIONS
            batch = [InferenceRequest(image=image, prompt=prompt, question=QUESTION, asked=Question(QUESTION, options))
                     for _ in range(args.batch)]
            backend.forget()
            before = backend.letter_stats().extra_steps
            with forced(backend, scripts[kind], eos):
                started = time.perf_counter()
                results = backend.generate(batch)
                seconds = time.perf_counter() - started
            if not all(r.completion_tokens == args.new_tokens and bool(r.option_probabilities) == bool(options)
                       for r in results):
                raise RuntimeError(f"{kind}: not {args.new_tokens} tokens with probabilities as asked: {results}")
            return seconds, backend.letter_stats().extra_steps - before

        for kind in KINDS:   # warm-up
            answer(kind)
        seconds: dict[str, list[float]] = {kind: [] for kind in KINDS}
        steps: dict[str, int] = {}
        for _ in range(args.repeats):
            for kind in KINDS:
                elapsed, steps[kind] = answer(kind)
                seconds[kind].append(elapsed)
        first_s, _ = probe_seconds(tokenizer, args.new_tokens, args.repeats, warm=False)
        warm_s, probe_steps = probe_seconds(tokenizer, args.new_tokens, args.repeats, warm=True)
        tables_s = letter_tables_seconds(tokenizer, args.repeats)
        backend.close()
    free = seconds["free_form"]

    def share(kind: str) -> float:
        return statistics.median(run / base for run, base in zip(seconds[kind], free)) - 1

    fallback_step = [miss - hit for miss, hit in zip(seconds["no_letter"], seconds["with_options"])]
    per_token = statistics.median(free) / args.new_tokens
    report = {
        "machine": machine(), "model": "tiny checkpoint (CPU, fp32)", "new_tokens": args.new_tokens,
        "batch": args.batch, "repeats": args.repeats,
        "median_ms": {kind: round(statistics.median(values) * 1000, 3) for kind, values in seconds.items()},
        "extra_steps_per_call": steps,
        "probe_share_of_answer": share("with_options"),
        "probe_and_fallback_share_of_answer": share("no_letter"),
        "fallback_step_ms": statistics.median(fallback_step) * 1000,
        "fallback_step_share_of_answer": statistics.median(step / base for step, base in zip(fallback_step, free)),
        "fallback_step_in_decode_steps": statistics.median(fallback_step) / per_token,
        "probe_alone_us_per_step": warm_s / probe_steps * 1e6,
        "probe_alone_share_of_answer": warm_s / probe_steps / per_token,
        "probe_alone_first_answer_ms": first_s * 1000,
        "probe_alone_first_answer_share": first_s / statistics.median(free),
        "vocabulary": len(tokenizer),
        "letter_tables_ms": tables_s * 1000,
    }
    write_results("option_probabilities", report, args.json)
    ms = report["median_ms"]
    print(f"median answer: {ms['with_options']:.1f} ms with options, {ms['free_form']:.1f} ms free-form, "
          f"{ms['no_letter']:.1f} ms with no letter after <answer>; "
          f"probe share {report['probe_share_of_answer']:+.2%}, "
          f"probe + extra step {report['probe_and_fallback_share_of_answer']:+.2%} (the step alone "
          f"{report['fallback_step_ms']:.1f} ms = {report['fallback_step_in_decode_steps']:.1f} decode steps); "
          f"probe alone {report['probe_alone_us_per_step']:.1f} us per step = "
          f"{report['probe_alone_share_of_answer']:.2%} of the answer; at a backend's first question with options "
          f"{report['probe_alone_first_answer_ms']:.1f} ms = {report['probe_alone_first_answer_share']:.2%}; "
          f"letter tables over {report['vocabulary']} tokens built in {report['letter_tables_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
