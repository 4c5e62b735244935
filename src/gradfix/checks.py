"""Checks shared by task vectors, transport and merging: architectures and finite values."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from gradfix.errors import MismatchError, NonFiniteError

Shapes = Mapping[str, tuple[int, ...]]

_MAX_LISTED = 10


def select_names(
    names: Iterable[str],
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
) -> list[str]:
    """Names kept by glob filters: those matching any ``include`` pattern and no ``exclude`` one.

    ``include=None`` keeps every name. Patterns are shell globs (``fnmatch``), e.g. ``"encoder.*"``
    or ``"*.bias"``. The result keeps the input order.
    """
    inc = [include] if isinstance(include, str) else list(include or [])
    exc = [exclude] if isinstance(exclude, str) else list(exclude or [])
    kept = []
    for name in names:
        if inc and not any(fnmatch.fnmatchcase(name, p) for p in inc):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exc):
            continue
        kept.append(name)
    return kept


def check_same_architecture(models: Mapping[str, Shapes], names: Iterable[str] | None = None) -> None:
    """Raise one :class:`MismatchError` listing every name or shape that differs between models.

    ``models`` maps a label (e.g. a path) to ``{tensor name: shape}``. When ``names`` is given only
    those names are compared (each must exist in every model); otherwise the union of all names.
    The message is one line: the count and the models, then the first differences separated by
    ``;`` (e.g. ``"2 tensor(s) differ between A, B: x: shapes differ (A [2], B [3]); y: missing
    in B"``), ending with how many more were left out.
    """
    labels = list(models)
    wanted = list(names) if names is not None else sorted(set().union(*[set(m) for m in models.values()]))
    problems: list[str] = []
    for name in wanted:
        missing = [label for label in labels if name not in models[label]]
        if missing:
            problems.append(f"{name}: missing in {', '.join(missing)}")
            continue
        shapes = {label: tuple(models[label][name]) for label in labels}
        if len(set(shapes.values())) > 1:
            detail = ", ".join(f"{label} {list(s)}" for label, s in shapes.items())
            problems.append(f"{name}: shapes differ ({detail})")
    if problems:
        shown = problems[:_MAX_LISTED]
        more = len(problems) - len(shown)
        tail = f"; ... and {more} more" if more else ""
        raise MismatchError(
            f"{len(problems)} tensor(s) differ between {', '.join(labels)}: " + "; ".join(shown) + tail
        )


def count_nonfinite(tensor: Tensor) -> int:
    """Number of NaN or Inf values in a floating-point tensor (0 for other dtypes).

    A finite sum in float64 proves every value finite (a NaN or Inf anywhere makes the sum NaN or
    Inf), so the exact count, which needs a boolean copy, is only taken when something is wrong.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    if tensor.element_size() == 1:  # float8 formats have no float64 reduction
        tensor = tensor.float()
    if bool(torch.isfinite(tensor.sum(dtype=torch.float64))):
        return 0
    flat = tensor.reshape(-1)
    return sum(int((~torch.isfinite(part)).sum()) for part in flat.split(1 << 24))


class FiniteCheck:
    """Collect tensors holding NaN or Inf while they are streamed, then raise one error for all.

    ``check(source, name, tensor)`` records a tensor of the file ``source`` that is not finite and
    returns whether it was finite; ``raise_if_any()`` raises :class:`NonFiniteError` naming every file and
    tensor found (the first ten of each file, with how many of its values are bad).
    """

    def __init__(self, what: str = "NaN or Inf") -> None:
        """``what`` names the problem in the message (default ``"NaN or Inf"``)."""
        self.what = what
        self._found: dict[str, list[tuple[str, int, int]]] = {}

    def check(self, source: str | Path, name: str, tensor: Tensor) -> bool:
        """Record ``tensor`` if it holds NaN or Inf; return whether it is finite."""
        bad = count_nonfinite(tensor)
        if bad:
            self._found.setdefault(str(source), []).append((name, bad, tensor.numel()))
        return not bad

    def __bool__(self) -> bool:
        return bool(self._found)

    def raise_if_any(self, hint: str = "the file is corrupted, or the training diverged") -> None:
        """Raise one :class:`NonFiniteError` for everything recorded (nothing recorded: no-op)."""
        if not self._found:
            return
        parts = []
        for source, rows in self._found.items():
            listed = ", ".join(f"{n!r} ({bad} of {total} values)" for n, bad, total in rows[:_MAX_LISTED])
            more = f" and {len(rows) - _MAX_LISTED} more" if len(rows) > _MAX_LISTED else ""
            parts.append(f"{source}: {self.what} in tensor(s) {listed}{more}")
        raise NonFiniteError("; ".join(parts) + f"; {hint}")
