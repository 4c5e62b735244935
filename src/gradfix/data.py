"""Labelled text examples: loading from JSON lines or CSV/TSV, few-shot sampling and batching."""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from gradfix.errors import ConfigError, DataError

T = TypeVar("T")

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}


ALL_SHOTS = "all"


UNLABELLED = ""
"""The label of an example of a family that needs none (e.g. a causal LM's text): all such
examples form one class, so ``shots`` of them are drawn."""


@dataclass(frozen=True)
class Example:
    """One example: the input ``text``, its class name ``label`` and where it was read.

    ``line`` is the 1-based line of the data file the example ends on (0 when it was not read
    from a file); it is not part of equality or hashing. ``fields`` holds what a recipe family
    reads besides the text (e.g. ``{"completion": ...}`` or an image path), as sorted
    ``(key, value)`` pairs so that examples stay hashable; see :meth:`Example.get`.
    """

    text: str
    label: str
    line: int = field(default=0, compare=False)
    fields: tuple[tuple[str, Any], ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        """The value of extra field ``key`` (``default`` when absent)."""
        return dict(self.fields).get(key, default)


def data_file(path: str | Path) -> Path:
    """``path`` as a data file: a :class:`DataError` naming it when it is missing, not a file, or
    of a type no reader knows (JSON lines ``.jsonl``/``.json``/``.ndjson``, ``.csv``, ``.tsv``)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: data file not found")
    if not p.is_file():
        raise DataError(f"{p}: not a file")
    suffix = p.suffix.lower()
    if suffix not in (*JSONL_SUFFIXES, *CSV_DELIMITERS):
        known = ", ".join((*JSONL_SUFFIXES, *CSV_DELIMITERS))
        raise DataError(f"{p}: unsupported data file type {suffix!r} (expected one of {known})")
    return p


def load_examples(path: str | Path, text_field: str = "text", label_field: str = "label") -> list[Example]:
    """Read labelled examples from a JSON-lines (``.jsonl``/``.json``) or CSV/TSV file.

    JSON lines: one object per line, blank lines skipped. CSV (``.csv``) and TSV (``.tsv``) need a
    header row naming ``text_field`` and ``label_field``. Labels may be strings or integers and are
    returned as stripped strings. Raises :class:`DataError` naming the file and the 1-based line
    for a missing or empty file, invalid JSON, a line that is not an object, or a missing/empty
    text or label.
    """
    p = data_file(path)
    suffix = p.suffix.lower()
    try:
        if suffix in JSONL_SUFFIXES:
            examples = _load_jsonl(p, text_field, label_field)
        else:
            examples = _load_csv(p, text_field, label_field, CSV_DELIMITERS[suffix])
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not valid UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not examples:
        raise DataError(f"{p}: file is empty (no examples)")
    return examples


def _field_value(record: dict[Any, Any], field: str, where: str, kind: str, allow_int: bool) -> str:
    """The stripped string value of ``field`` in ``record``, or a DataError located at ``where``."""
    if field not in record or record[field] is None:
        raise DataError(f"{where}: missing {kind} field {field!r}")
    value = record[field]
    if isinstance(value, bool) or not isinstance(value, (str, int) if allow_int else str):
        wanted = "a string or an integer" if allow_int else "a string"
        raise DataError(f"{where}: {kind} field {field!r} must be {wanted}, got {type(value).__name__}")
    text = str(value)
    if not text.strip():
        raise DataError(f"{where}: empty {kind} field {field!r}")
    return text.strip() if kind == "label" else text


def jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line, object)`` for each non-blank line of a JSON-lines file; a :class:`DataError` naming
    the file and line for invalid JSON or a line that is not an object."""
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
            except (ValueError, RecursionError) as exc:  # e.g. huge integers, deep nesting
                reason = " ".join(str(exc).split())[:120] or type(exc).__name__
                raise DataError(
                    f"{where}: invalid JSON ({reason}); expected one JSON object per line"
                ) from exc
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def _load_jsonl(path: Path, text_field: str, label_field: str) -> list[Example]:
    """Parse a JSON-lines file into examples (blank lines skipped)."""
    examples: list[Example] = []
    for lineno, record in jsonl_records(path):
        where = f"{path}, line {lineno}"
        text = _field_value(record, text_field, where, "text", allow_int=False)
        label = _field_value(record, label_field, where, "label", allow_int=True)
        examples.append(Example(text=text, label=label, line=lineno))
    return examples


def _load_csv(path: Path, text_field: str, label_field: str, delimiter: str) -> list[Example]:
    """Parse a CSV/TSV file with a header row into examples."""
    examples: list[Example] = []
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        try:
            columns = reader.fieldnames
        except csv.Error as exc:
            raise DataError(f"{path}, line {reader.reader.line_num or 1}: malformed header ({exc})") from exc
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
            except csv.Error as exc:  # DictReader.line_num is still the previous row's: ask its reader
                raise DataError(f"{path}, line {reader.reader.line_num}: malformed row ({exc})") from exc
            where = f"{path}, line {reader.line_num}"
            text = _field_value(row, text_field, where, "text", allow_int=False)
            label = _field_value(row, label_field, where, "label", allow_int=False)
            examples.append(Example(text=text, label=label, line=reader.line_num))
    return examples


def label_set(examples: Iterable[Example]) -> list[str]:
    """Sorted unique labels of ``examples``."""
    return sorted({ex.label for ex in examples})


def parse_shots(value: object) -> int | str:
    """Validate a ``shots`` setting: a positive integer, or ``"all"`` (every example, in file order).

    Accepts ints and strings (``"3"``, ``"all"``, any case); raises :class:`ConfigError` otherwise.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text == ALL_SHOTS:
            return ALL_SHOTS
        if text.isdigit() and int(text) > 0:
            return int(text)
    elif isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise ConfigError(f"shots must be a positive integer or '{ALL_SHOTS}', got {value!r}")


def _where(source: str | Path | None, example: Example, position: int) -> str:
    """``"file, line N"`` for an example read from a file, else ``"example N"``."""
    if source is not None and example.line:
        return f"{source}, line {example.line}"
    prefix = f"{source}: " if source is not None else ""
    return f"{prefix}example {position}"


def check_known_labels(
    examples: Sequence[Example],
    labels: Sequence[str],
    source: str | Path | None = None,
    owner: str = "the label set",
) -> None:
    """Raise :class:`DataError` if an example's label is not in ``labels``.

    The one-line message names the first offending row (file and line when known) and lists
    every unknown label with how many rows carry it. ``owner`` says whose label set it is
    (e.g. a model's head).
    """
    known = set(labels)
    bad = [(i, ex) for i, ex in enumerate(examples, start=1) if ex.label not in known]
    if not bad:
        return
    position, first = bad[0]
    counts: dict[str, int] = {}
    for _, ex in bad:
        counts[ex.label] = counts.get(ex.label, 0) + 1
    listed = ", ".join(f"{label!r} ({n} row{'s' if n > 1 else ''})" for label, n in list(counts.items())[:10])
    raise DataError(
        f"{_where(source, first, position)}: label {first.label!r} (text {_preview(first.text)}) is not "
        f"in {owner} {sorted(known)}; unknown labels: {listed}"
    )


def sample_shots(
    examples: Sequence[Example],
    shots: int | str,
    seed: int,
    labels: Sequence[str] | None = None,
    source: str | Path | None = None,
) -> list[Example]:
    """Draw ``shots`` examples per class, deterministically from ``random.Random(seed)``.

    Classes are ``labels`` in the given order, or the sorted labels of ``examples``. The result
    lists the classes in that order, and within a class the examples in draw order; the same
    inputs and seed always give the same list. ``shots="all"`` returns every example in the
    given order (no draw), so that votes over disjoint parts of a data set add up to the votes
    over all of it. ``source`` (the data file) is named in error messages. Raises
    :class:`DataError` if ``shots`` is not a positive integer or ``"all"``, if an example's label
    is not in ``labels``, or if a class has fewer than ``shots`` examples.
    """
    try:
        shots = parse_shots(shots)
    except ConfigError as exc:
        raise DataError(str(exc)) from None
    classes = list(dict.fromkeys(labels)) if labels is not None else label_set(examples)
    check_known_labels(examples, classes, source, "the labels")
    if shots == ALL_SHOTS:
        return list(examples)
    count = int(shots)
    pools: dict[str, list[Example]] = {name: [] for name in classes}
    for ex in examples:
        pools[ex.label].append(ex)
    short = [(name, len(pool)) for name, pool in pools.items() if len(pool) < count]
    if short:
        detail = ", ".join(f"{name!r} has {count}" for name, count in short)
        prefix = f"{source}: " if source is not None else ""
        raise DataError(
            f"{prefix}{count} shot(s) per class requested but {detail}; lower --shots or add examples"
        )
    rng = random.Random(seed)
    drawn: list[Example] = []
    for name in classes:
        drawn.extend(rng.sample(pools[name], count))
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
