"""Benchmark and recording rows -> evaluation items, read with pyarrow (parquet) and the csv module (TSV).

Four formats (see docs/evaluation.md):
- vlmevalkit: TSV or parquet with `index`, `question`, one column per option `A`, `B`, ... (empty = no such
  option), `answer` (a letter), `category`, and `image` (base64 or bytes; a short value naming another row's
  index reuses that row's image, as VLMEvalKit writes repeated images) or `image_path`.
- cvbench: CV-Bench's jsonl or parquet: `idx`, `question`, `choices` (list), `answer` like "(A)", `type`,
  `task`, and `image` (parquet) or `filename` relative to the file's folder.
- stvqa: STVQA-7K-style parquet: `question` with `options`, or `question_with_options`; `answer_option_text`
  like "(B) behind"; `category`.
- jsonl: the project's own: `question`, `options`, `answer` (letter or option text), `category`, and `image`
  (a path relative to the file) or a recording: `bag`, `topic`, `time` (seconds from the start), optionally
  `depth_topic` and `camera_info_topic`.

A row that cannot be asked (no question, no options, an answer that is not one of its options, no image) is
returned as a BadRow with its index and the reason; an image that cannot be decoded is found when it is
loaded (EvalItem.load). The question is kept exactly as the data writes it: the replay backend matches on it.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from spatialthinker_ros.core.images import decode_rgb
from spatialthinker_ros.core.request import MAX_REQUEST_IMAGE_PIXELS, ImageError
from spatialthinker_ros.core.parsing import choose_option
from spatialthinker_ros.core.prompt import answer_options, option_letter
from spatialthinker_ros.core.sources import Source
from spatialthinker_ros.evaluation.errors import BadRowError
from spatialthinker_ros.evaluation.recordings import RecordingCache, RecordingFrame

FORMATS = ("auto", "vlmevalkit", "cvbench", "stvqa", "jsonl")
MAX_OPTIONS = 26
_IMAGE_REFERENCE_CHARS = 64   # VLMEvalKit: an `image` this short is the index of the row holding the image


@dataclass(frozen=True)
class EvalItem:
    """One multiple-choice question. `options` is the list the data gives; () when the question carries its
    options inline. `answer` is the correct letter. `load` reads the image (raises BadRowError)."""

    index: str
    question: str
    options: tuple[str, ...]
    answer: str
    category: str
    load: Callable[[], Source] = field(repr=False, compare=False)

    @property
    def offered(self) -> list[str]:
        """The options as the model is offered them (the list, else those in the question)."""
        return answer_options(self.question, self.options)


@dataclass(frozen=True)
class BadRow:
    index: str
    reason: str


@dataclass
class Dataset:
    items: list[EvalItem]
    bad: list[BadRow]
    format: str


Row = Union[EvalItem, BadRow]


def read_dataset(paths: Sequence[Path], data_format: str = "auto", categories: Sequence[str] = (),
                 limit: Optional[int] = None, recordings: Optional[RecordingCache] = None) -> Dataset:
    """The rows of one or more files, in order, filtered to `categories` (when given) and cut to `limit`.

    With several files each index is prefixed with the file's stem, so indices stay unique. Raises ValueError
    for a file that cannot be read at all (missing, unknown format, missing columns).
    """
    if data_format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {data_format!r}")
    items: list[EvalItem] = []
    bad: list[BadRow] = []
    formats = set()
    wanted = set(categories)
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"data file {path} does not exist")
        fmt = detect_format(path) if data_format == "auto" else data_format
        formats.add(fmt)
        prefix = f"{path.stem}:" if len(paths) > 1 else ""
        for row in _READERS[fmt](path, recordings):
            row = _prefixed(row, prefix)
            if isinstance(row, BadRow):
                bad.append(row)
            elif not wanted or row.category in wanted:
                items.append(row)
    if limit is not None:
        items = items[:limit]
    return Dataset(items=items, bad=bad, format="+".join(sorted(formats)))


def detect_format(path: Path) -> str:
    """The format of a file from its extension and column names."""
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        return "vlmevalkit"
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as lines:
            first = next((line for line in lines if line.strip()), "{}")
        try:
            keys = set(json.loads(first))
        except (ValueError, TypeError):
            raise ValueError(f"{path}: the first line is not a JSON object") from None
        return "cvbench" if "choices" in keys else "jsonl"
    if suffix == ".parquet":
        columns = set(_parquet_columns(path))
        if "choices" in columns:
            return "cvbench"
        if {"answer_option_text", "question_with_options"} & columns:
            return "stvqa"
        if {"A", "B", "answer"} <= columns:
            return "vlmevalkit"
        raise ValueError(f"{path}: cannot tell the format from its columns {sorted(columns)}; pass --format")
    raise ValueError(f"{path}: unknown file type {suffix or '(none)'}; expected .tsv, .parquet or .jsonl")


# ---- readers --------------------------------------------------------------------------------------------


def _read_vlmevalkit(path: Path, recordings: Optional[RecordingCache]) -> Iterator[Row]:
    records = list(_records(path))
    _require(path, records, ("question", "answer"))
    images = {str(r.get("index")): r.get("image") for r in records if not _is_reference(r.get("image"))}
    for number, record in enumerate(records):
        index = _index(record.get("index"), number)
        options = []
        for i in range(MAX_OPTIONS):
            value = record.get(option_letter(i))
            if _empty(value):
                break
            options.append(str(value).strip())
        image = record.get("image")
        if _is_reference(image):
            image = images.get(str(image).strip())
        yield _item(index, record.get("question"), options, record.get("answer"), record.get("category"),
                    _image_loader(image, record.get("image_path"), path.parent))


def _read_cvbench(path: Path, recordings: Optional[RecordingCache]) -> Iterator[Row]:
    for number, record in enumerate(_records(path)):
        index = _index(record.get("idx", record.get("index")), number)
        choices = record.get("choices")
        options = [str(c) for c in choices] if isinstance(choices, (list, tuple, np.ndarray)) else []
        category = "/".join(str(record[k]) for k in ("type", "task") if not _empty(record.get(k))) or None
        yield _item(index, record.get("question"), options, record.get("answer"), category,
                    _image_loader(record.get("image"), record.get("filename"), path.parent))


def _read_stvqa(path: Path, recordings: Optional[RecordingCache]) -> Iterator[Row]:
    for number, record in enumerate(_records(path)):
        index = _index(record.get("id", record.get("index")), number)
        raw_options = record.get("options")
        if isinstance(raw_options, (list, tuple, np.ndarray)) and len(raw_options) and not _empty(record.get("question")):
            question, options = record.get("question"), [str(o) for o in raw_options]
        else:
            question, options = record.get("question_with_options", record.get("question")), []
        image = record.get("image", record.get("images"))
        if isinstance(image, (list, tuple, np.ndarray)):
            image = image[0] if len(image) else None
        answer = record.get("answer_option_text", record.get("answer"))
        yield _item(index, question, options, answer, record.get("category"),
                    _image_loader(image, record.get("image_path"), path.parent))


def _read_jsonl(path: Path, recordings: Optional[RecordingCache]) -> Iterator[Row]:
    recordings = recordings or RecordingCache()
    for number, record in _json_lines(path):
        if not isinstance(record, dict):
            yield BadRow(str(number), f"line {number} is not valid JSON" if record is None
                         else f"line {number} is not a JSON object")
            continue
        index = _index(record.get("index"), number)   # default: the line number
        options = record.get("options") or []
        if not isinstance(options, list):
            yield BadRow(index, '"options" must be a list of strings')
            continue
        if not _empty(record.get("bag")):
            try:
                where = RecordingFrame.from_row(record, path.parent)
            except ValueError as exc:
                yield BadRow(index, str(exc))
                continue
            load: Union[Callable[[], Source], str] = lambda where=where: recordings.frame(where)
        else:
            load = _image_loader(None, record.get("image"), path.parent)
        yield _item(index, record.get("question"), [str(o) for o in options], record.get("answer"),
                    record.get("category"), load)


_READERS = {"vlmevalkit": _read_vlmevalkit, "cvbench": _read_cvbench, "stvqa": _read_stvqa, "jsonl": _read_jsonl}


# ---- rows -----------------------------------------------------------------------------------------------


def _item(index: str, question: Any, options: list[str], answer: Any, category: Any,
          load: Union[Callable[[], Source], str]) -> Row:
    """The item, or the BadRow saying why it cannot be asked."""
    if _empty(question) or not str(question).strip():
        return BadRow(index, "no question")
    question = str(question)
    if isinstance(load, str):
        return BadRow(index, load)
    offered = answer_options(question, options)
    if len(offered) < 2:
        return BadRow(index, "no options (neither a list nor (A) ... (B) ... in the question)")
    answer = "" if _empty(answer) else str(answer).strip()
    letter = choose_option(answer, offered)
    if not letter:
        return BadRow(index, f"answer {answer!r} is not one of its {len(offered)} options")
    return EvalItem(index=index, question=question, options=tuple(options), answer=letter,
                    category="all" if _empty(category) else str(category), load=load)


def _prefixed(row: Row, prefix: str) -> Row:
    return replace(row, index=prefix + row.index) if prefix else row


def _image_loader(image: Any, image_path: Any, folder: Path) -> Union[Callable[[], Source], str]:
    """A loader for embedded bytes (base64 text, bytes, or a {"bytes", "path"} struct) or a file path; a str
    is the reason there is no image."""
    if isinstance(image, dict):
        image_path = image_path if _empty(image.get("path")) or image.get("bytes") else image.get("path")
        image = image.get("bytes")
    if isinstance(image, (bytes, bytearray, memoryview)) and len(image):
        data = bytes(image)
        return lambda: Source(decode_image(data))
    if isinstance(image, str) and image.strip():
        text = image

        def from_base64() -> Source:
            try:
                data = base64.b64decode(text, validate=False)
            except (binascii.Error, ValueError) as exc:
                raise BadRowError(f"image is not valid base64 ({exc})") from None
            return Source(decode_image(data))

        return from_base64
    if not _empty(image_path) and str(image_path).strip():
        file = Path(str(image_path))
        file = file if file.is_absolute() else folder / file

        def from_file() -> Source:
            try:
                data = file.read_bytes()
            except OSError as exc:
                raise BadRowError(f"cannot read image {file}: {exc.strerror or exc}") from None
            return Source(decode_image(data))

        return from_file
    return "no image (neither embedded nor a path)"


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 HxWx3, or BadRowError."""
    if not data:
        raise BadRowError("the image is empty")
    try:
        rgb = decode_rgb(data, MAX_REQUEST_IMAGE_PIXELS)   # the pipeline then applies the run's own limit
    except ImageError as exc:
        raise BadRowError(f"the image ({len(data)} bytes) cannot be used: {exc}") from None
    if rgb is None:
        raise BadRowError(f"the image ({len(data)} bytes) cannot be decoded")
    return rgb


# ---- files ----------------------------------------------------------------------------------------------


def _records(path: Path) -> Iterable[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:   # pyarrow raises several types for a file that is not parquet
            raise ValueError(f"{path}: cannot read as parquet ({exc})") from None
    if suffix == ".jsonl":      # a line that is not an object is reported as a row without a question
        return [r if isinstance(r, dict) else {"index": str(n), "question": None} for n, r in _json_lines(path)]
    csv.field_size_limit(sys.maxsize)   # base64 images are megabytes per field
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line; the value is None for a line that is not valid JSON."""
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except ValueError:
                    yield number, None


def _parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path).names
    except Exception as exc:
        raise ValueError(f"{path}: cannot read as parquet ({exc})") from None


def _require(path: Path, records: list[dict[str, Any]], columns: Sequence[str]) -> None:
    if records and not all(c in records[0] for c in columns):
        raise ValueError(f"{path}: missing column(s) {', '.join(c for c in columns if c not in records[0])}")


def _index(value: Any, number: int) -> str:
    return str(number) if _empty(value) else str(value)


def _empty(value: Any) -> bool:
    """None, "" and NaN (how TSV and parquet write a missing cell)."""
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and math.isnan(value))


def _is_reference(image: Any) -> bool:
    return isinstance(image, str) and 0 < len(image.strip()) <= _IMAGE_REFERENCE_CHARS
