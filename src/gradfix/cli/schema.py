"""The value types of the command line's options, shared by the flags and ``--config`` YAML.

Every option of ``transport``, ``merge`` and ``eval`` has one :class:`Kind`: a pydantic type
(validated in strict mode, after a conversion of the strings the command line gives) and the
words an error uses for what it expected. :func:`cli_kind` derives the kind of a settings field
from its type in :mod:`gradfix.settings` (``int``, ``float``, ``bool``, ``str``, ``Literal``,
lists and ``| None``); a few fields narrow it (positive integers, ranges, registries of names).
"""

from __future__ import annotations

import functools
import math
import operator
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, Field
from typing_extensions import Required, TypedDict

from gradfix.errors import ConfigError

_INT = re.compile(r"^\s*[+-]?\d+\s*$")
_TRUE = {"true", "yes", "1"}
_FALSE = {"false", "no", "0"}


def _to_bool(value: Any) -> Any:
    """``true/false/yes/no/1/0`` (any case, or the ints 1 and 0) as a bool; anything else as it is."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
    return value


def _to_int(value: Any) -> Any:
    """A string of digits as an int; anything else as it is (strict validation refuses it)."""
    if isinstance(value, str) and _INT.match(value):
        return int(value)
    return value


def _to_float(value: Any) -> Any:
    """A string that reads as a number as a float; anything else as it is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _word_or(word: str, convert: Any) -> Any:
    """A converter that reads ``word`` in any case as itself and converts anything else."""

    def read(value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == word:
            return word
        return convert(value)

    return read


def _to_lower(value: Any) -> Any:
    """A string stripped and in lower case (``CUDA:0`` → ``cuda:0``); anything else as it is."""
    return value.strip().lower() if isinstance(value, str) else value


def _to_list(value: Any) -> Any:
    """A single value as a one-element list; a list as it is."""
    return value if isinstance(value, (list, tuple)) else [value]


def _to_size(value: Any) -> Any:
    """``"2GiB"``, ``"500MB"`` or a number of bytes as an int; anything unreadable as it is."""
    from gradfix.cli.config import parse_size

    if isinstance(value, str):
        try:
            return parse_size(value)
        except ConfigError:
            return value
    return value


Int = Annotated[int, BeforeValidator(_to_int)]
PositiveInt = Annotated[int, BeforeValidator(_to_int), Field(gt=0)]
Float = Annotated[float, BeforeValidator(_to_float), Field(allow_inf_nan=False)]
NonNegative = Annotated[float, BeforeValidator(_to_float), Field(allow_inf_nan=False, ge=0)]
Bool = Annotated[bool, BeforeValidator(_to_bool)]
Size = Annotated[int, BeforeValidator(_to_size), Field(gt=0)]


class TaskEntry(TypedDict, total=False):
    """One entry of ``tasks:`` in a merge config."""

    source_base: Required[str]
    source_finetuned: Required[str]
    data: str | None


@dataclass(frozen=True)
class Kind:
    """The type of one option: its pydantic annotation and what an error says it expected."""

    annotation: Any
    expected: str
    choices: tuple[str, ...] = ()
    many: bool = False
    """Whether the option takes several values (``--flag A B`` or a YAML list)."""


def choice(names: Iterable[str]) -> Kind:
    """One of ``names`` (a closed set or the keys of a registry)."""
    names = tuple(names)
    return Kind(Literal[names], f"one of {', '.join(names)}", choices=names)


def optional(kind: Kind) -> Kind:
    """``kind`` or ``None`` (``null`` in YAML; the option then takes its default behaviour)."""
    return Kind(kind.annotation | None, kind.expected, kind.choices, kind.many)


def listed(kind: Kind, expected: str) -> Kind:
    """A list of ``kind`` values; a single value counts as a list of one."""
    items = types.GenericAlias(list, (kind.annotation,))  # list[kind.annotation], built at run time
    return Kind(Annotated[items, BeforeValidator(_to_list)], expected, kind.choices, True)


INT = Kind(Int, "an integer")
POSITIVE_INT = Kind(PositiveInt, "a positive integer")
FLOAT = Kind(Float, "a finite number")
NON_NEGATIVE = Kind(NonNegative, "a finite number ≥ 0")
BOOL = Kind(Bool, "true or false (yes/no, 1/0)")
STR = Kind(str, "a string")
STR_LIST = listed(STR, "a string or a list of strings")
FLOAT_LIST = listed(FLOAT, "finite numbers")
SIZE = Kind(Size, "a size such as 2GiB, 500MB or a number of bytes")
DEVICE = Kind(
    Annotated[str, BeforeValidator(_to_lower), Field(pattern=r"^(cpu|cuda|cuda:\d+|auto)$")],
    "cpu, cuda, cuda:N or auto",
)
SHOTS = Kind(
    Annotated[PositiveInt | Literal["all"], BeforeValidator(_word_or("all", _to_int))],
    "a positive integer or 'all'",
)
ALPHA = Kind(
    Annotated[Float | Literal["auto"], BeforeValidator(_word_or("auto", _to_float))],
    "a finite number or 'auto'",
)
THRESHOLD_GRID = Kind(
    Annotated[
        list[Annotated[NonNegative | Literal["naive"], BeforeValidator(_word_or("naive", _to_float))]],
        BeforeValidator(_to_list),
    ],
    "finite numbers ≥ 0 or 'naive'",
    many=True,
)
ALPHA_GRID = listed(NON_NEGATIVE, "finite numbers ≥ 0")
DENSITY = Kind(
    Annotated[float, BeforeValidator(_to_float), Field(allow_inf_nan=False, gt=0, le=1)], "a number in (0, 1]"
)
TASKS = Kind(
    Annotated[list[TaskEntry], BeforeValidator(_to_list)],
    "a list of mappings with source_base, source_finetuned and optionally data",
    many=True,
)

_SCALARS = {int: INT, float: FLOAT, bool: BOOL, str: STR}


def cli_kind(hint: Any) -> Kind:
    """The kind of a settings field from its type: scalars, ``Literal``, ``list[...]``, ``X | None``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _SCALARS:
        return _SCALARS[hint]
    if origin is Literal:
        return choice(args)
    if origin in (Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return optional(cli_kind(functools.reduce(operator.or_, rest)))
    if origin is list and args and args[0] in (str, float):
        return STR_LIST if args[0] is str else FLOAT_LIST
    raise TypeError(f"no command-line type for {hint!r}")


def expected_of(kind: Kind, value: Any) -> str:
    """The one-line error for ``value`` refused by ``kind``."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"expected {kind.expected}, got {value}"
    return f"expected {kind.expected}, got {value!r}"
