"""Architecture checks shared by task vectors, transport and merging."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence

from gradfix.errors import MismatchError

Shapes = Mapping[str, tuple[int, ...]]

_MAX_LISTED = 20


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
        tail = f"\n  ... and {more} more" if more else ""
        raise MismatchError(
            f"{len(problems)} tensor(s) differ between {', '.join(labels)}:\n  " + "\n  ".join(shown) + tail
        )
