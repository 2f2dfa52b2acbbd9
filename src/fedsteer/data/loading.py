"""Read and validate example files (JSONL or CSV) so a bad row fails loudly at its line."""

from __future__ import annotations

import csv
import gzip
import io
import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fedsteer.data.errors import DataError
from fedsteer.data.schema import Example

SUFFIXES = (".jsonl", ".csv")  # each may also be gzip-compressed (.jsonl.gz, .csv.gz)


def file_kind(path: Path) -> str:
    """".jsonl" or ".csv" for a data file, looking through a trailing .gz."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def load_examples(
    path: Path, labels: Sequence[str], *, pair: bool, max_chars: int
) -> list[Example]:
    """Load every row of `path` as an `Example`, raising `DataError` on the first bad row.

    Labels may be given as an int id or as a label name. Texts longer than `max_chars`
    are truncated (one warning per file says how many), never dropped.
    """
    path = Path(path)
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    if path.is_dir():
        raise DataError("a folder, not a data file; name the .jsonl or .csv file in it", path)
    if not path.is_file():
        raise DataError("file not found", path)
    suffix = file_kind(path)
    if suffix not in SUFFIXES:
        raise DataError(
            f"unsupported file type {suffix!r} (use .jsonl or .csv, optionally .gz)", path)
    rows = _jsonl_rows(path) if suffix == ".jsonl" else _csv_rows(path, pair)
    examples, truncated = [], 0
    for line, row in rows:
        ex, cut = _to_example(row, path, line, labels, pair, max_chars)
        examples.append(ex)
        truncated += cut
    if not examples:
        raise DataError("no rows", path)
    if truncated:
        warnings.warn(
            f"{path}: truncated {truncated} row(s) longer than {max_chars} characters",
            stacklevel=2,
        )
    return examples


def _decoded_lines(path: Path) -> list[str]:
    """Decode line by line so a non-UTF-8 byte is reported at its own line."""
    raw_lines = _read_bytes(path).split(b"\n")
    lines = []
    for number, raw in enumerate(raw_lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(
                f"not valid UTF-8 (byte {err.start + 1} of the line); save the file as UTF-8",
                path,
                number,
            ) from None
        lines.append(text.lstrip("\ufeff") if number == 1 else text)
    return lines


def _read_bytes(path: Path) -> bytes:
    if path.suffix.lower() != ".gz":
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as err:
        raise DataError(f"not a readable gzip file ({err}); re-copy or decompress it",
                        path) from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed object); blank lines are layout, not rows, so skipped."""
    for number, text in enumerate(_decoded_lines(path), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"invalid JSON: {err.msg} (column {err.colno})", path, number) from None
        if not isinstance(row, dict):
            raise DataError(f"expected a JSON object, got {type(row).__name__}", path, number)
        yield number, row


def _csv_rows(path: Path, pair: bool) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (first line of the record, row dict); the header must name text,label[,text_pair]."""
    reader = csv.reader(io.StringIO("\n".join(_decoded_lines(path)), newline=""))
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        raise DataError("empty CSV file (expected a header text,label)", path) from None
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:
        raise DataError(f"CSV header names a column twice (header: {','.join(header)})",
                        path, 1, twice[0])
    required = ["text", "label"] + (["text_pair"] if pair else [])
    for name in required:
        if name not in header:
            raise DataError(f"CSV header lacks column (header: {','.join(header)})", path, 1, name)
    while True:
        start = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise DataError(f"malformed CSV: {err}", path, start) from None
        if not any(cell.strip() for cell in record):
            continue
        if len(record) != len(header):
            raise DataError(
                f"expected {len(header)} columns, got {len(record)}", path, start
            )
        yield start, dict(zip(header, record, strict=True))


def _to_example(
    row: dict[str, Any],
    path: Path,
    line: int,
    labels: Sequence[str],
    pair: bool,
    max_chars: int,
) -> tuple[Example, int]:
    """Validate one row; returns the example and 1 if any of its text was truncated."""
    text = _text_field(row, "text", path, line)
    text_pair = None
    if pair:
        text_pair = _text_field(row, "text_pair", path, line)
    elif row.get("text_pair") not in (None, ""):
        raise DataError("unexpected for a single-text task (its template has no {text_pair})",
                        path, line, "text_pair")
    label = _label_field(row, path, line, labels)
    cut = len(text) > max_chars or (text_pair is not None and len(text_pair) > max_chars)
    text = text[:max_chars]
    text_pair = text_pair[:max_chars] if text_pair is not None else None
    return Example(text=text, label=label, text_pair=text_pair), int(cut)


def _text_field(row: dict[str, Any], name: str, path: Path, line: int) -> str:
    if name not in row:
        raise DataError("missing field", path, line, name)
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", path, line, name)
    if not value.strip():
        raise DataError("empty text", path, line, name)
    return value


def _label_field(row: dict[str, Any], path: Path, line: int, labels: Sequence[str]) -> int:
    """Accept an int id or a label name (CSV ids arrive as digit strings)."""
    if "label" not in row:
        raise DataError("missing field", path, line, "label")
    value = row["label"]
    known = ", ".join(labels)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise DataError(
            f"expected an int id or a label name, got {type(value).__name__}", path, line, "label"
        )
    if isinstance(value, str):
        name = value.strip()
        if name in labels:
            return list(labels).index(name)
        if not (name.isascii() and name.lstrip("-").isdigit()):
            raise DataError(f"unknown label {value!r} (known: {known})", path, line, "label")
        value = int(name)
    if not 0 <= value < len(labels):
        raise DataError(
            f"label id {value} out of range 0..{len(labels) - 1} (known: {known})",
            path,
            line,
            "label",
        )
    return value
