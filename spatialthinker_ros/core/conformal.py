"""Split conformal prediction sets over answer options (as in KnowNo, Ren et al. 2023), ROS-free.

A calibration is one number, the threshold q: the k-th smallest nonconformity score 1 - p(true option) of n
labelled rows, k = ceil((n + 1) * coverage). An answer's prediction set is every offered option whose score
1 - p is at most q. On questions exchangeable with the calibration rows, asked with the same setup (weights,
dtype, quantization, backend, image sizes, prompt: CalibrationSetup), the set holds the right option with probability at least `coverage`, on average
over questions (a marginal guarantee, not one per question).

Coverages are taken as the decimals they print as (0.7 is 7/10, not the nearest binary fraction), so k and the
rows needed are exact.
"""

from __future__ import annotations

import json
import math
from array import array
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional, Sequence


FILE_FORMAT = "spatialthinker-calibration"
FILE_VERSION = 3


class CalibrationError(ValueError):
    """A calibration that cannot be made (too few rows, bad coverage) or a file that is not a valid one."""


def _exact(coverage: float) -> Fraction:
    if isinstance(coverage, bool) or not isinstance(coverage, (int, float)) or not math.isfinite(coverage) \
            or not 0 < coverage < 1:
        raise CalibrationError(f"coverage must be a number strictly between 0 and 1, not {coverage!r}")
    return Fraction(repr(float(coverage)))


def rank(n: int, coverage: float) -> int:
    """k = ceil((n + 1) * coverage): which smallest score is the threshold (may exceed n: see rows_needed)."""
    return math.ceil((n + 1) * _exact(coverage))


def rows_needed(coverage: float) -> int:
    """The fewest calibration rows for which a finite threshold gives `coverage` (k <= n): ceil(1/alpha) - 1,
    e.g. 9 for 0.9, 19 for 0.95, 99 for 0.99."""
    c = _exact(coverage)
    return math.ceil(c / (1 - c))


def nonconformity(probabilities: Sequence[float], true_index: int) -> float:
    """1 - p(true option): large when the model gave the right option little probability. Kept in [0, 1]
    against rounding in probabilities that sum to 1 only nearly."""
    return _score(probabilities[true_index])


def _score(probability: float) -> float:
    return min(1.0, max(0.0, 1.0 - float(probability)))


def conformal_threshold(scores: Sequence[float], coverage: float) -> float:
    """The k-th smallest score; CalibrationError when there are too few rows for that coverage."""
    n, k = len(scores), rank(len(scores), coverage)
    if k > n:
        raise CalibrationError(f"{n} calibration row{'s' if n != 1 else ''} cannot give {float(coverage):g} coverage: "
                               f"it needs at least {rows_needed(coverage)} (ceil(1/alpha) - 1); a few hundred keep "
                               "the achieved coverage within a few points of the target")
    return sorted(float(s) for s in scores)[k - 1]


def prediction_set(probabilities: Sequence[float], letters: Sequence[str], threshold: float) -> list[str]:
    """Every offered letter whose probability p has 1 - p <= threshold (p >= 1 - threshold), in option order.
    Computed as scores, like the calibration's, so a row's true option at its own score's threshold is always
    in. May be empty: then no option is likely enough, and a planner should ask for help as for several."""
    if len(probabilities) != len(letters):
        raise ValueError(f"{len(probabilities)} probabilities for {len(letters)} options")
    return [letter for letter, p in zip(letters, probabilities) if _score(p) <= threshold]


@dataclass(frozen=True)
class CalibrationSetup:
    """What a calibration holds for: the probabilities change with any of these, and with them the guarantee.
    Settings a backend does not have are None (replay sees no image; a server's dtype is not known here)."""

    model: str
    backend: str
    # which weights: checkpoint.checkpoint_fingerprint (transformers); "served <id>", the model id the server
    # reports (openai); "" (replay)
    checkpoint: str
    dtype: Optional[str]             # the resolved torch dtype the model runs in (transformers)
    quantization: Optional[str]      # none | 4bit | 8bit (transformers)
    min_pixels: Optional[int]        # the image processor's limits (transformers: both; openai: max_pixels)
    max_pixels: Optional[int]
    max_input_pixels: int            # frames are downscaled to this before the prompt states their size
    prompt_style: str
    # whether the backend can run steps past generate (transformers without compile): an answer that wrote its
    # letter in more than one token, or wrote none, then still gets probabilities; otherwise none (transformers)
    letters_continue: Optional[bool]

    @classmethod
    def replay(cls, max_input_pixels: int, prompt_style: str) -> CalibrationSetup:
        """Replay answers from a file: no model, no image size, the recorded probabilities."""
        return cls(model="replay", backend="replay", checkpoint="", dtype=None, quantization=None, min_pixels=None,
                   max_pixels=None, max_input_pixels=max_input_pixels, prompt_style=prompt_style,
                   letters_continue=None)


# The setup's fields (most are named as the node parameters they come from): messages and docs list them from here.
SETUP_FIELDS = tuple(f.name for f in fields(CalibrationSetup))


def setup_differences(calibrated: CalibrationSetup, here: CalibrationSetup,
                      labels: tuple[str, str] = ("calibrated", "here")) -> Optional[str]:
    """"name: calibrated X, here Y; ..." for each setting that differs, or None when the setups are equal."""
    first, second = labels
    differ = [f"{name}: {first} {getattr(calibrated, name)!r}, {second} {getattr(here, name)!r}"
              for name in SETUP_FIELDS if getattr(calibrated, name) != getattr(here, name)]
    return "; ".join(differ) or None


@dataclass(frozen=True)
class Calibration:
    """A split conformal calibration: the threshold for prediction sets, measured on `n` rows for `coverage`."""

    threshold: float
    coverage: float
    n: int
    setup: CalibrationSetup

    def __post_init__(self) -> None:
        _exact(self.coverage)
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < rows_needed(self.coverage):
            raise CalibrationError(f"n must be an integer of at least {rows_needed(self.coverage)} rows for "
                                   f"{self.coverage:g} coverage, not {self.n!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0 <= self.threshold <= 1:
            raise CalibrationError(f"threshold must be a number in [0, 1] (a score 1 - p), not {self.threshold!r}")

    @classmethod
    def fit(cls, scores: Sequence[float], coverage: float, setup: CalibrationSetup) -> Calibration:
        return cls(threshold=conformal_threshold(scores, coverage), coverage=float(coverage), n=len(scores),
                   setup=setup)

    def prediction_set(self, probabilities: Sequence[float], letters: Sequence[str]) -> list[str]:
        return prediction_set(probabilities, letters, self.threshold)

    def to_json(self, **extra: Any) -> dict[str, Any]:
        """The file's content; `extra` adds informational keys (e.g. "runs") that load ignores."""
        return {"format": FILE_FORMAT, "version": FILE_VERSION, "threshold": self.threshold,
                "coverage": self.coverage, "n": self.n, "setup": asdict(self.setup), **extra}

    def save(self, path: Path, **extra: Any) -> None:
        Path(path).write_text(json.dumps(self.to_json(**extra), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Calibration:
        """A calibration file, checked strictly: a wrong calibration silently breaks the guarantee."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise CalibrationError(f"cannot read calibration file {path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise CalibrationError(f"{path} is not JSON ({exc})") from None
        try:
            return cls.from_json(data)
        except CalibrationError as exc:
            raise CalibrationError(f"{path}: {exc}") from None

    @classmethod
    def from_json(cls, data: Any) -> Calibration:
        if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
            raise CalibrationError(f'not a calibration file (no "format": "{FILE_FORMAT}"); make one with '
                                   "spatialthinker-eval calibrate")
        missing = [k for k in ("threshold", "coverage", "n", "setup") if k not in data]
        if missing:
            raise CalibrationError(f"missing {', '.join(missing)}")
        setup = data["setup"]
        if not isinstance(setup, dict):
            raise CalibrationError(f"setup must be an object holding {', '.join(SETUP_FIELDS)}, not {setup!r}")
        lacking = [name for name in SETUP_FIELDS if name not in setup]
        if lacking:
            raise CalibrationError(f"its setup lacks {', '.join(lacking)} (a calibration file of version "
                                   f"{data.get('version')!r}, which a calibration must also hold for); recalibrate "
                                   "with spatialthinker-eval calibrate on runs of this version")
        if data.get("version") != FILE_VERSION or sorted(setup) != sorted(SETUP_FIELDS):
            raise CalibrationError(f"calibration file version {data.get('version')!r} with setup fields "
                                   f"{', '.join(sorted(setup))}; this version reads {FILE_VERSION} with "
                                   f"{', '.join(SETUP_FIELDS)}")
        optional_str = lambda v: v is None or _is_str(v)
        optional_int = lambda v: v is None or _is_int(v)
        for name, ok in (("model", _is_str), ("backend", _is_str), ("prompt_style", _is_str),
                         ("checkpoint", lambda v: isinstance(v, str)), ("dtype", optional_str),
                         ("quantization", optional_str), ("max_input_pixels", _is_int), ("min_pixels", optional_int),
                         ("max_pixels", optional_int),
                         ("letters_continue", lambda v: v is None or isinstance(v, bool))):
            if not ok(setup[name]):
                raise CalibrationError(f"setup.{name} has the wrong type: {setup[name]!r}")
        return cls(threshold=data["threshold"], coverage=data["coverage"], n=data["n"],
                   setup=CalibrationSetup(**setup))


def _is_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def read_calibration_file(path: str) -> Optional[Calibration]:
    """The calibration file at `path`, None for "" (no calibration); CalibrationError for a bad file. Cheap: read
    it before a model loads, and check it against the loaded setup with check_setup."""
    return Calibration.load(Path(path)) if path else None


def check_setup(calibration: Optional[Calibration], path: str, setup: CalibrationSetup) -> None:
    """CalibrationError when `calibration` (read from `path`) was made with another setup than the one that will
    answer, naming each difference: a silently wrong calibration breaks the guarantee."""
    difference = calibration and setup_differences(calibration.setup, setup)
    if difference:
        raise CalibrationError(f"{path} was calibrated with another setup ({difference}); recalibrate with "
                               "spatialthinker-eval calibrate on runs of this setup")


def answer_prediction_set(probabilities: Sequence[float], letters: Sequence[str],
                          calibration: Optional[Calibration]) -> tuple[list[str], float]:
    """(prediction_set, prediction_set_coverage) of one answer: empty and 0 without a calibration or without
    probabilities for exactly these options (a free-form question, a backend that gives none). The set is taken
    from the probabilities as SpatialAnswer carries them (float32), so a planner recomputing it from the message
    with the calibration's threshold gets the same set, also at the boundary."""
    if calibration is None or not probabilities or len(probabilities) != len(letters):
        return [], 0.0
    return calibration.prediction_set(array("f", probabilities).tolist(), letters), calibration.coverage
