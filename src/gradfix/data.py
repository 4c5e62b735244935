"""Labelled text examples: loading from JSON lines or CSV/TSV, few-shot sampling and batching."""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from gradfix.errors import ConfigError, DataError

T = TypeVar("T")

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}


@dataclass(frozen=True)
class Example:
    """One labelled example: the input ``text`` and its class name ``label``."""

    text: str
    label: str


def load_examples(
    path: str | Path, text_field: str = "text", label_field: str = "label"
) -> list[Example]:
    """Read labelled examples from a JSON-lines (``.jsonl``/``.json``) or CSV/TSV file.

    JSON lines: one object per line, blank lines skipped. CSV (``.csv``) and TSV (``.tsv``) need a
    header row naming ``text_field`` and ``label_field``. Labels may be strings or integers and are
    returned as stripped strings. Raises :class:`DataError` naming the file and the 1-based line
    for a missing or empty file, invalid JSON, a line that is not an object, or a missing/empty
    text or label.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: data file not found")
    if not p.is_file():
        raise DataError(f"{p}: not a file")
    suffix = p.suffix.lower()
    try:
        if suffix in _JSONL_SUFFIXES:
            examples = _load_jsonl(p, text_field, label_field)
        elif suffix in _CSV_DELIMITERS:
            examples = _load_csv(p, text_field, label_field, _CSV_DELIMITERS[suffix])
        else:
            known = ", ".join((*_JSONL_SUFFIXES, *_CSV_DELIMITERS))
            raise DataError(f"{p}: unsupported data file type {suffix!r} (expected one of {known})")
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not valid UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not examples:
        raise DataError(f"{p}: file is empty (no examples)")
    return examples


def _field_value(
    record: dict[Any, Any], field: str, where: str, kind: str, allow_int: bool
) -> str:
    """The stripped string value of ``field`` in ``record``, or a DataError located at ``where``."""
    if field not in record or record[field] is None:
        raise DataError(f"{where}: missing {kind} field {field!r}")
    value = record[field]
    if isinstance(value, bool) or not isinstance(value, (str, int) if allow_int else str):
        wanted = "a string or an integer" if allow_int else "a string"
        raise DataError(
            f"{where}: {kind} field {field!r} must be {wanted}, got {type(value).__name__}"
        )
    text = str(value)
    if not text.strip():
        raise DataError(f"{where}: empty {kind} field {field!r}")
    return text.strip() if kind == "label" else text


def _load_jsonl(path: Path, text_field: str, label_field: str) -> list[Example]:
    """Parse a JSON-lines file into examples (blank lines skipped)."""
    examples: list[Example] = []
    with path.open(encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{where}: invalid JSON ({exc.msg}, column {exc.colno}); "
                    "expected one JSON object per line"
                ) from exc
            if not isinstance(record, dict):
                raise DataError(
                    f"{where}: expected a JSON object, got {type(record).__name__}"
                )
            text = _field_value(record, text_field, where, "text", allow_int=False)
            label = _field_value(record, label_field, where, "label", allow_int=True)
            examples.append(Example(text=text, label=label))
    return examples


def _load_csv(path: Path, text_field: str, label_field: str, delimiter: str) -> list[Example]:
    """Parse a CSV/TSV file with a header row into examples."""
    examples: list[Example] = []
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        try:
            columns = reader.fieldnames
        except csv.Error as exc:
            raise DataError(f"{path}, line 1: malformed header ({exc})") from exc
        if not columns:
            raise DataError(f"{path}: file is empty (no header row, no examples)")
        missing = [f for f in (text_field, label_field) if f not in columns]
        if missing:
            raise DataError(
                f"{path}, line 1: header lacks column(s) {', '.join(map(repr, missing))}; "
                f"it has {', '.join(map(repr, columns))}"
            )
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise DataError(f"{path}, line {reader.line_num}: malformed row ({exc})") from exc
            where = f"{path}, line {reader.line_num}"
            text = _field_value(row, text_field, where, "text", allow_int=False)
            label = _field_value(row, label_field, where, "label", allow_int=False)
            examples.append(Example(text=text, label=label))
    return examples


def label_set(examples: Iterable[Example]) -> list[str]:
    """Sorted unique labels of ``examples``."""
    return sorted({ex.label for ex in examples})


def sample_shots(
    examples: Sequence[Example],
    shots: int,
    seed: int,
    labels: Sequence[str] | None = None,
) -> list[Example]:
    """Draw ``shots`` examples per class, deterministically from ``random.Random(seed)``.

    Classes are ``labels`` in the given order, or the sorted labels of ``examples``. The result
    lists the classes in that order, and within a class the examples in draw order; the same
    inputs and seed always give the same list. Raises :class:`DataError` if ``shots < 1``, if an
    example's label is not in ``labels``, or if a class has fewer than ``shots`` examples.
    """
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise DataError(f"shots must be a positive integer, got {shots!r}")
    classes = list(dict.fromkeys(labels)) if labels is not None else label_set(examples)
    pools: dict[str, list[Example]] = {name: [] for name in classes}
    for position, ex in enumerate(examples, start=1):
        if ex.label not in pools:
            raise DataError(
                f"example {position} (text {_preview(ex.text)}) has label {ex.label!r}, "
                f"which is not one of the labels {classes}"
            )
        pools[ex.label].append(ex)
    short = [(name, len(pool)) for name, pool in pools.items() if len(pool) < shots]
    if short:
        detail = ", ".join(f"{name!r} has {count}" for name, count in short)
        raise DataError(f"{shots} shot(s) per class requested but {detail}")
    rng = random.Random(seed)
    drawn: list[Example] = []
    for name in classes:
        drawn.extend(rng.sample(pools[name], shots))
    return drawn


def _preview(text: str, limit: int = 40) -> str:
    """A short quoted preview of ``text`` for error messages."""
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def batched(items: Iterable[T], batch_size: int) -> Iterator[list[T]]:
    """Yield consecutive lists of at most ``batch_size`` items (the last one may be shorter)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == batch_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
