"""The option-letter probe: the probabilities of the offered letters at the answer's letter position, read from the
model's own scores while generate runs, and one extra step where the answer wrote no letter after <answer>."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, StoppingCriteria

from spatialthinker_ros.core.backends.base import LETTER_FORMS, LetterPosition, letter_written, renormalised
from spatialthinker_ros.core.backends.transformers.loading import CACHE
from spatialthinker_ros.core.prompt import option_letter


@dataclass(frozen=True)
class LetterStats:
    """Option-letter probing since the backend was made (benchmarks and tests read it)."""

    probed: int           # answers to questions with options that the letter probe followed
    fallback_steps: int   # extra forward steps run because an answer wrote no letter after <answer>


class LetterTokens:
    """The tokenizer's single tokens that write an option letter, by the run of the answer tag before them, and each
    token's text (decoded once, on first sight)."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._pieces: dict[int, str] = {}
        self._by_run: dict[str, tuple[list[int], list[tuple[int, int]]]] = {}
        self._indices: dict[tuple[str, torch.device], torch.Tensor] = {}

    def piece(self, token: int) -> str:
        text = self._pieces.get(token)
        if text is None:
            text = self._pieces[token] = self._tokenizer.decode([token])
        return text

    def segments(self, run: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Every letter's token ids after `run`, concatenated A..Z, and each letter's (start, end) in that list."""
        if run not in self._by_run:
            ids: list[int] = []
            spans = []
            for index in range(26):
                start = len(ids)
                for form in LETTER_FORMS:
                    piece = (">" if not run else "") + form + option_letter(index)
                    encoded = self._tokenizer.encode(piece, add_special_tokens=False)
                    if (len(encoded) == 1 and encoded[0] not in ids[start:] and self.piece(encoded[0]) == piece
                            and letter_written(run, piece)):
                        ids.append(encoded[0])
                spans.append((start, len(ids)))
            self._by_run[run] = (ids, spans)
        return self._by_run[run]

    def ids(self, run: str) -> list[int]:
        return self.segments(run)[0]

    def index(self, run: str, device: torch.device) -> torch.Tensor:
        """ids(run) as an index tensor on `device`, made once (not one host-to-device copy per step)."""
        key = (run, device)
        tensor = self._indices.get(key)
        if tensor is None:
            tensor = self._indices[key] = torch.tensor(self.ids(run), dtype=torch.long, device=device)
        return tensor

    def probabilities(self, run: str, logits: list[float], count: int) -> tuple[tuple[float, ...], str]:
        """The first `count` letters' probabilities, renormalised over them, from the scores of ids(run)."""
        spans = self.segments(run)[1][:count]
        if any(start == end for start, end in spans):
            missing = [option_letter(i) for i, (start, end) in enumerate(spans) if start == end]
            return (), f"the tokenizer has no single token for option letter(s) {', '.join(missing)}"
        top = max(logits[: spans[-1][1]])   # scores are logits: shift by the largest before exponentiating
        if not math.isfinite(top):
            return (), "every offered option letter had zero probability at the letter position"
        masses = [math.fsum(math.exp(v - top) for v in logits[start:end]) for start, end in spans]
        return renormalised(masses), ""


@dataclass(frozen=True)
class _LetterRecord:
    step: int                   # generated tokens before the letter position
    run: str                    # the answer tag's text before it (see LetterPosition)
    logits: torch.Tensor        # the step's scores of LetterTokens.ids(run)


class LetterProbe:
    """Keeps, for each probed row, the scores of the option-letter tokens at its answer's letter position
    (LetterPosition); nothing else (no per-step scores over the vocabulary).

    It hooks into generate twice. `token_follower` (a StoppingCriteria that never stops) feeds each row's new token
    to its LetterPosition: generate calls it right before it reads its own stop flag from the device, so reading
    the new tokens there adds no wait for the device of its own (a logits processor reading them would wait for
    the step's forward pass before the step's sampling could be queued). `scores_reader` (a LogitsProcessor, first
    in the list) gathers a few dozen scores, without leaving the device, at the steps that may be the letter's."""

    def __init__(self, letters: LetterTokens, rows: list[int], prompt_length: int):
        self.letters = letters
        self.prompt_length = prompt_length
        self.records: dict[int, _LetterRecord] = {}
        self._positions = {row: LetterPosition() for row in rows}
        self._looking = list(rows)
        self.scores_reader = _LetterScores(self)
        self.token_follower = _LetterTokensFollowed(self)

    def follow(self, input_ids: torch.Tensor) -> None:
        """Feeds the token just appended to every row still looking for its letter position."""
        if not self._looking:
            return
        last = input_ids[:, -1].tolist()
        for row in list(self._looking):
            position = self._positions[row]
            position.feed(self.letters.piece(last[row]))
            if position.found:
                self._looking.remove(row)
            elif position.run is None:
                self.records.pop(row, None)   # "<answer" began another word

    def read(self, input_ids: torch.Tensor, scores: torch.Tensor) -> None:
        """Keeps the letter tokens' scores of the rows whose next token may write their letter."""
        step = input_ids.shape[1] - self.prompt_length
        for row in self._looking:
            run = self._positions[row].run
            if run is not None:
                ids = self.letters.index(run, scores.device)
                self.records[row] = _LetterRecord(step, run, scores[row, ids].float())


class _LetterScores(LogitsProcessor):
    """LetterProbe's hook before each token is chosen."""

    def __init__(self, probe: LetterProbe):
        self._probe = probe

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._probe.read(input_ids, scores)
        return scores

    # generate's LogitsProcessorList inspects every processor's signature at every step; a stored one is found
    # at once (inspect.signature returns __signature__), which cuts that per-step cost (bench/README.md)
    __call__.__signature__ = inspect.signature(__call__)   # type: ignore[attr-defined]


class _LetterTokensFollowed(StoppingCriteria):
    """LetterProbe's hook after each token is appended; it never stops a row."""

    def __init__(self, probe: LetterProbe):
        self._probe = probe
        self._never: Optional[torch.Tensor] = None   # the batch's "no row stops", made once per generate call

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        self._probe.follow(input_ids)
        if self._never is None:
            self._never = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return self._never


class _FirstScores(LogitsProcessor):
    """The first step's scores of some token ids (row 0)."""

    def __init__(self, ids: torch.Tensor):
        self._ids = ids
        self.logits: Optional[torch.Tensor] = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.logits is None:
            self.logits = scores[0, self._ids].float()
        return scores


class LetterReader:
    """A backend's option-letter probing: a LetterProbe for each generate call, each probed row's probabilities
    read from it afterwards, and the counts since the backend was made (LetterStats).

    `can_continue`: this setup can run one more step from a generation's KV cache (transformers >= 5.23, no
    compile), which an answer that wrote no letter after <answer> needs."""

    def __init__(self, tokenizer: Any, can_continue: bool):
        self._tokenizer = tokenizer
        self._can_continue = can_continue
        self._letters: Optional[LetterTokens] = None   # made at the first question with options
        self._probed = self._fallback_steps = 0

    def probe(self, rows: list[int], prompt_length: int) -> LetterProbe:
        """The probe of one generate call, following `rows`."""
        if self._letters is None:
            self._letters = LetterTokens(self._tokenizer)
        self._probed += len(rows)
        return LetterProbe(self._letters, rows, prompt_length)

    def stats(self) -> LetterStats:
        """How many answers were probed for option letters, and how many of them needed the extra step (no letter
        written after <answer>)."""
        return LetterStats(probed=self._probed, fallback_steps=self._fallback_steps)

    def read(self, model: Any, probe: LetterProbe, row: int, count: int, output: Any, attention_mask: torch.Tensor,
             rope_deltas: torch.Tensor) -> tuple[tuple[float, ...], str]:
        """Row's probabilities of its `count` offered letters at its answer's letter position, or () and why not.

        Where the model wrote no letter there, the letter distribution is read one step further, as if it had
        written "(" (the card's "<answer> (B) ..."): one more step continued from the generation's KV cache."""
        record = probe.records.get(row)
        if record is None:
            return (), "the answer has no <answer> tag to read the option letter's probabilities at"
        sequence = output.sequences[row]
        column = probe.prompt_length + record.step
        if column >= sequence.shape[0]:
            return (), "the answer was cut off at its option letter"
        chosen = int(sequence[column])
        letters = probe.letters
        position = LetterPosition()
        position.feed("<answer" + record.run)
        position.feed(letters.piece(chosen))
        if not position.found:
            return (), "the answer was cut off at its option letter"
        if chosen not in letters.ids(record.run) and not record.run.endswith("("):
            if not self._can_continue:
                return (), ("the model wrote no option letter after <answer>, and this setup cannot continue from "
                            "the generation's cache to read one (transformers >= 5.23 without compile can)")
            suffix = (">" if not record.run else "") + ("(" if record.run.endswith((" ", "\n")) else " (")
            logits = self._logits_after(model, output, row, column, suffix, attention_mask, rope_deltas,
                                        letters.index(record.run + suffix, sequence.device))
            self._fallback_steps += 1
            record = _LetterRecord(record.step, record.run + suffix, logits)
        return letters.probabilities(record.run, record.logits.tolist(), count)

    def _logits_after(self, model: Any, output: Any, row: int, column: int, suffix: str, attention_mask: torch.Tensor,
                      rope_deltas: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The scores of `ids` after the row's first `column` tokens and then `suffix`: one generate step from the
        row's slice of the generation's KV cache (which holds every column before the last generated token)."""
        cache = DynamicCache([(layer.keys[row:row + 1, :, :column], layer.values[row:row + 1, :, :column])
                              for layer in getattr(output, CACHE).layers])
        suffix_ids = torch.tensor(self._tokenizer.encode(suffix, add_special_tokens=False),
                                  device=output.sequences.device)
        ids_in = torch.cat([output.sequences[row, :column], suffix_ids])[None]
        prompt_mask = attention_mask[row]
        mask = torch.cat([prompt_mask, prompt_mask.new_ones(ids_in.shape[1] - prompt_mask.shape[0])])[None]
        first = _FirstScores(ids)
        model.model.rope_deltas = rope_deltas[row:row + 1]
        model.generate(input_ids=ids_in, attention_mask=mask, max_new_tokens=1, do_sample=False, temperature=None,
                       top_p=None, top_k=None, logits_processor=LogitsProcessorList([first]), **{CACHE: cache})
        return first.logits
