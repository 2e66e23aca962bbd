"""The option-letter probe: the probabilities of the offered letters at the answer's letter position, each letter read
through the tokens the tokenizer writes it with there, from the model's own scores while generate runs, and from
one more step where that takes more than one token (or where the answer wrote no letter after <answer>)."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, StoppingCriteria

from spatialthinker_ros.core.backends.base import LETTER_FORMS, LetterPosition, letter_written, renormalised
from spatialthinker_ros.core.backends.transformers.loading import CACHE, NEUTRAL_DECODING
from spatialthinker_ros.core.parsing import answer_opened_at
from spatialthinker_ros.core.prompt import option_letter

_LETTER_COUNT = 26   # option_letter's range


@dataclass(frozen=True)
class LetterStats:
    """Option-letter probing since the backend was made (benchmarks and tests read it)."""

    probed: int        # answers to questions with options that the letter probe followed
    extra_steps: int   # forward steps run after generate: the card's form after an answer that wrote no letter, or
                       # an offered letter that takes more than one token where the answer wrote its letter


def card_form(run: str) -> str:
    """What the card's "<answer> (A) cat </answer>" writes before its letter once `run` is written (the answer tag's
    text so far, LetterPosition.run): "> (" right after "<answer", " (" after ">", "(" after whitespace."""
    if "(" in run:
        return ""
    return (">" if not run else "") + ("(" if run[-1:].isspace() else " (")


class LetterTokens:
    """How the tokenizer writes each option letter after a form (the text between the answer tag's text so far and
    the letter: ">" in "<answer>B", " (" in "<answer> (B", "(" in "<answer>\\n(B"), and each token's text (decoded
    once, on first sight).

    A letter after such a form starts a pre-token of its own in Qwen2's pre-tokenizer, so the tokenizer writes
    form + letter the same wherever it stands: encoding it alone gives those tokens (">B" is one token, ">Q" two)."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._pieces: dict[int, str] = {}
        self._written: dict[str, tuple[tuple[int, ...], ...]] = {}
        self._forms: dict[str, tuple[str, ...]] = {}
        self._firsts: dict[str, list[int]] = {}
        self._indices: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._apart: dict[str, bool] = {}
        self.tag_close = tuple(tokenizer.encode(">", add_special_tokens=False))   # the answer tag's ">" alone

    def piece(self, token: int) -> str:
        text = self._pieces.get(token)
        if text is None:
            text = self._pieces[token] = self._tokenizer.decode([token])
        return text

    def written(self, form: str) -> tuple[tuple[int, ...], ...]:
        """Each letter's tokens, A..Z, when the tokenizer writes `form` and then the letter."""
        if form not in self._written:
            texts = [form + option_letter(i) for i in range(_LETTER_COUNT)]
            encoded = self._tokenizer(texts, add_special_tokens=False)["input_ids"]   # one call for all 26
            self._written[form] = tuple(tuple(tokens) for tokens in encoded)
        return self._written[form]

    def written_apart(self, form: str) -> bool:
        """Whether the tokenizer writes ">" + form + each letter as a ">" token and then form + letter: then a
        letter written after a ">" token alone is read as written; otherwise where the ">" was (Qwen writes ">B" as
        one token but ">Q" as ">" then "Q": after a lone ">", B is a tokenization the model never writes)."""
        if form not in self._apart:
            self._apart[form] = all(tokens == self.tag_close + alone for tokens, alone
                                    in zip(self.written(">" + form), self.written(form)))
        return self._apart[form]

    def forms(self, run: str) -> tuple[str, ...]:
        """The forms a letter may take at the letter position after `run`: each of LETTER_FORMS (">" first right
        after "<answer") that leaves the letter there, and the card's (card_form)."""
        if run not in self._forms:
            forms = [(">" if not run else "") + form for form in LETTER_FORMS]
            self._forms[run] = tuple(dict.fromkeys([form for form in forms if letter_written(run, form + "A")]
                                                   + [card_form(run)]))
        return self._forms[run]

    def ids(self, run: str) -> list[int]:
        """The tokens whose scores the probe keeps at a step after `run`: each letter's first token in each form."""
        if run not in self._firsts:
            firsts = (tokens[0] for form in self.forms(run) for tokens in self.written(form))
            self._firsts[run] = list(dict.fromkeys(firsts))
        return self._firsts[run]

    def index(self, run: str, device: torch.device) -> torch.Tensor:
        """ids(run) as an index tensor on `device`, made once (not one host-to-device copy per step)."""
        key = (run, device)
        tensor = self._indices.get(key)
        if tensor is None:
            tensor = self._indices[key] = torch.tensor(self.ids(run), dtype=torch.long, device=device)
        return tensor

    def form_of(self, run: str, token: int) -> Optional[str]:
        """The form `token` writes its letter in at the letter position after `run`; None when it writes no letter
        there (or in a form the probe kept no scores for)."""
        piece = self.piece(token)
        if letter_written(run, piece) and piece[:-1] in self.forms(run):
            return piece[:-1]
        return None


@dataclass(frozen=True)
class _LetterRecord:
    step: int                   # generated tokens before the letter position
    run: str                    # the answer tag's text before it (see LetterPosition)
    logits: torch.Tensor        # the step's scores of LetterTokens.ids(run)
    at_tag_close: Optional["_LetterRecord"] = None   # run "", one step before, where a lone ">" token was written


class LetterProbe:
    """Keeps, for each probed row, the scores of the option-letter tokens at the letter position of each <answer>
    it writes (LetterPosition), so that the one the parser takes the answer from can be read afterwards; nothing
    else (no per-step scores over the vocabulary).

    It hooks into generate twice. `token_follower` (a StoppingCriteria that never stops) feeds each row's new token
    to its LetterPosition: generate calls it right before it reads its own stop flag from the device, so reading
    the new tokens there adds no wait for the device of its own (a logits processor reading them would wait for
    the step's forward pass before the step's sampling could be queued). `scores_reader` (a LogitsProcessor, first
    in the list) gathers a few dozen scores, without leaving the device, at the steps that may be the letter's."""

    def __init__(self, letters: LetterTokens, rows: list[int], prompt_length: int):
        self.letters = letters
        self.prompt_length = prompt_length
        self.records: dict[int, list[_LetterRecord]] = {row: [] for row in rows}   # one per letter position reached
        self.pending: dict[int, _LetterRecord] = {}   # at a step that may be the letter's: generation may end there
        self._at_tag_close: dict[int, _LetterRecord] = {}   # the pending record where a lone ">" closed the tag
        self._positions = {row: LetterPosition() for row in rows}
        self.scores_reader = _LetterScores(self)
        self.token_follower = _LetterTokensFollowed(self)

    def follow(self, input_ids: torch.Tensor) -> None:
        """Feeds the token just appended to every row."""
        last = input_ids[:, -1].tolist()
        for row, position in self._positions.items():
            closes_tag = position.run == "" and (last[row],) == self.letters.tag_close and row in self.pending
            if closes_tag:
                self._at_tag_close[row] = self.pending[row]
            position.feed(self.letters.piece(last[row]))
            if position.found:
                record = self.pending.pop(row)
                if row in self._at_tag_close:
                    record = replace(record, at_tag_close=self._at_tag_close.pop(row))
                self.records[row].append(record)
                self._positions[row] = LetterPosition()   # a later <answer> may be the one the parser takes
            elif position.run is None:
                self.pending.pop(row, None)               # "<answer" began another word
                self._at_tag_close.pop(row, None)
            elif not closes_tag:
                self._at_tag_close.pop(row, None)         # more was written after the lone ">"

    def read(self, input_ids: torch.Tensor, scores: torch.Tensor) -> None:
        """Keeps the letter tokens' scores of the rows whose next token may write their letter."""
        step = input_ids.shape[1] - self.prompt_length
        for row, position in self._positions.items():
            if position.run is not None:
                ids = self.letters.index(position.run, scores.device)
                self.pending[row] = _LetterRecord(step, position.run, scores[row, ids].float())


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
    """The first step's scores (row 0)."""

    def __init__(self) -> None:
        self.logits: Optional[torch.Tensor] = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.logits is None:
            self.logits = scores[0].float()
        return scores


class LetterReader:
    """A backend's option-letter probing: a LetterProbe for each generate call, each probed row's probabilities
    read from it afterwards, and the counts since the backend was made (LetterStats).

    `can_continue`: this setup can run more steps from a generation's KV cache (transformers >= 5.23, no compile),
    which a letter written in more than one token needs (and an answer that wrote no letter after <answer>)."""

    def __init__(self, tokenizer: Any, can_continue: bool):
        self._tokenizer = tokenizer
        self._can_continue = can_continue
        self._letters = LetterTokens(tokenizer)
        self._probed = self._extra_steps = 0

    def probe(self, rows: list[int], prompt_length: int) -> LetterProbe:
        """The probe of one generate call, following `rows`."""
        self._probed += len(rows)
        return LetterProbe(self._letters, rows, prompt_length)

    def stats(self) -> LetterStats:
        """How many answers were probed for option letters, and how many forward steps were run after generate."""
        return LetterStats(probed=self._probed, extra_steps=self._extra_steps)

    def read(self, model: Any, probe: LetterProbe, row: int, count: int, text: str, output: Any,
             attention_mask: torch.Tensor, rope_deltas: torch.Tensor) -> tuple[tuple[float, ...], str]:
        """Row's probabilities of its `count` offered letters at the letter position of the <answer> the parser
        takes the answer from (its output `text`), or () and why not.

        Each letter is read through the tokens the tokenizer writes it with in the form the answer wrote its letter
        in: the product of those tokens' probabilities. Where the model wrote no letter there, in the card's form
        ("<answer> (B) ...") continued after what was written. Tokens past the letter position come from more
        steps, continued from the generation's KV cache."""
        record = self._record(probe, row, text, output.sequences[row])
        if record is None:
            return (), "the answer has no <answer> tag to read the option letter's probabilities at"
        sequence = output.sequences[row]
        column = probe.prompt_length + record.step
        if column >= sequence.shape[0]:
            return (), "the answer was cut off at its option letter"
        letters = probe.letters
        form = letters.form_of(record.run, int(sequence[column]))
        if form is not None and record.at_tag_close is not None and not letters.written_apart(form):
            record, form = record.at_tag_close, ">" + form   # read where the ">" was: ">B" or ">", "Q"
        note = ""
        if form is None:
            form = card_form(record.run)
            note = (f"read as if the answer went on in the card's form (\"<answer{record.run}{form}A)\"): "
                    "the model wrote no option letter after <answer>")
        written = letters.written(form)[:count]
        shared = 0   # tokens every letter starts with: their probabilities are common to all and cancel out
        while all(len(tokens) > shared + 1 and tokens[shared] == written[0][shared] for tokens in written):
            shared += 1
        scores: dict[tuple[int, ...], Any] = {}   # by the tokens written before: each token's score there
        for tokens in written:
            for end in range(shared, len(tokens)):
                if tokens[:end] not in scores:
                    scores[tokens[:end]] = self._scores_after(model, probe, record, row, tokens[:end], output,
                                                              attention_mask, rope_deltas)
                    if scores[tokens[:end]] is None:
                        return (), ("the model wrote no option letter after <answer>, or wrote it in more than one "
                                    "token, and this setup cannot continue from the generation's cache to read it "
                                    "(transformers >= 5.23 without compile can)")
        weights = []
        for tokens in written:
            # the first step's scores are shared by every letter (no normalising); later steps' are log-probabilities
            weights.append(math.fsum(float(scores[tokens[:end]][tokens[end]]) for end in range(shared, len(tokens))))
        top = max(weights)
        if not math.isfinite(top):
            return (), "every offered option letter had zero probability at the letter position"
        return renormalised([math.exp(weight - top) for weight in weights]), note

    def _record(self, probe: LetterProbe, row: int, text: str, sequence: torch.Tensor) -> Optional[_LetterRecord]:
        """The record of the <answer> the parser takes the answer from: the one whose tag starts where the parser's
        does in `text` (the generated tokens before each record decode to that text's start)."""
        start = answer_opened_at(text)
        if start is None:
            return None
        records = probe.records[row] + ([probe.pending[row]] if row in probe.pending else [])
        for record in records:
            before = self._tokenizer.decode(sequence[probe.prompt_length:probe.prompt_length + record.step],
                                            skip_special_tokens=True)
            if before.rfind("<answer") == start:
                return record
        return None

    def _scores_after(self, model: Any, probe: LetterProbe, record: _LetterRecord, row: int, tokens: tuple[int, ...],
                      output: Any, attention_mask: torch.Tensor, rope_deltas: torch.Tensor) -> Any:
        """Scores at the letter position after `tokens` (written there first), by token id: the kept ones where
        `tokens` is empty, else log-probabilities from one more step (None where this setup cannot run one)."""
        if not tokens:
            return dict(zip(probe.letters.ids(record.run), record.logits.tolist()))
        if not self._can_continue:
            return None
        self._extra_steps += 1
        column = probe.prompt_length + record.step
        return torch.log_softmax(self._logits_after(model, output, row, column, tokens, attention_mask, rope_deltas),
                                 -1).cpu()

    def _logits_after(self, model: Any, output: Any, row: int, column: int, tokens: tuple[int, ...],
                      attention_mask: torch.Tensor, rope_deltas: torch.Tensor) -> torch.Tensor:
        """The scores after the row's first `column` tokens and then `tokens`: one generate step from the row's
        slice of the generation's KV cache (which holds every column before the last generated token)."""
        cache = DynamicCache([(layer.keys[row:row + 1, :, :column], layer.values[row:row + 1, :, :column])
                              for layer in getattr(output, CACHE).layers])
        ids_in = torch.cat([output.sequences[row, :column], torch.tensor(tokens, device=output.sequences.device)])[None]
        prompt_mask = attention_mask[row]
        mask = torch.cat([prompt_mask, prompt_mask.new_ones(ids_in.shape[1] - prompt_mask.shape[0])])[None]
        first = _FirstScores()
        model.model.rope_deltas = rope_deltas[row:row + 1]
        model.generate(input_ids=ids_in, attention_mask=mask, max_new_tokens=1, **NEUTRAL_DECODING, do_sample=False,
                       temperature=None, top_p=None, top_k=None, logits_processor=LogitsProcessorList([first]),
                       **{CACHE: cache})
        return first.logits
