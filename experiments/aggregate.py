"""Reading the raw JSON results and summarising them: means and spreads over seeds, gap shares.

Shared by :mod:`report` (the Markdown page) and :mod:`plots` (the figures).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PAPER_KS = (1, 2, 5, 10, 20, 50)
PAPER = {
    "zero-shot B": 54.45,
    "fine-tuned B": 94.73,
    "naive": 54.78,
    "oracle mask": 85.71,
    **{
        f"GradFix k={k}": v for k, v in zip(PAPER_KS, (64.45, 65.96, 67.57, 67.93, 68.15, 68.15), strict=True)
    },
    **{
        f"few-shot FT, 1 step k={k}": v
        for k, v in zip(PAPER_KS, (59.89, 62.29, 64.95, 65.12, 66.02, 66.26), strict=True)
    },
}
"""The paper's Table 1 averages (CLIP ViT-B/16, DataComp → LAION, 5 tasks), accuracy in %."""


def paper_gap(method: str) -> float | None:
    """The paper's share of the zero-shot → fine-tune gap closed by ``method`` (None if absent)."""
    if method not in PAPER:
        return None
    zero, top = PAPER["zero-shot B"], PAPER["fine-tuned B"]
    return (PAPER[method] - zero) / (top - zero)


def load(raw: Path, prefix: str) -> list[dict[str, Any]]:
    """Every raw result file whose name starts with ``prefix``, sorted by name."""
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(raw.glob(f"{prefix}*.json"))]


ALIASES = {"adaptive (shots)": "adaptive (shots, min loss)"}
"""Old method names of raw rows → their names now (the computation is the same)."""


def label(row: dict[str, Any]) -> str:
    """The display name of a row's method (with its k when it has one)."""
    name = ALIASES.get(row["method"], row["method"])
    return f"{name} k={row['k']}" if row.get("k") is not None and "study" not in row else name


@dataclass
class Stat:
    """Mean and population spread of a list of values (``n`` of them)."""

    mean: float
    std: float
    n: int

    def pct(self) -> str:
        """``"86.4 ± 1.2"`` in percent (no spread for a single value)."""
        if self.n > 1:
            return f"{100 * self.mean:.1f} ± {100 * self.std:.1f}"
        return f"{100 * self.mean:.1f}"


def stat(values: Iterable[float]) -> Stat | None:
    """The :class:`Stat` of ``values`` (None when empty)."""
    values = [float(v) for v in values]
    if not values:
        return None
    spread = statistics.pstdev(values) if len(values) > 1 else 0.0
    return Stat(statistics.fmean(values), spread, len(values))


def table1_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The Table 1 rows of a result (support-retrieval rows left out)."""
    return [r for r in result["rows"] if "study" not in r and "test" in r]


def by_task(rows: Sequence[dict[str, Any]], name: str, key: str = "test") -> dict[str, Stat]:
    """Per task, the spread over seeds of ``key`` for the method named ``name``."""
    out: dict[str, Stat] = {}
    tasks = sorted({r["task"] for r in rows}, key=[r["task"] for r in rows].index)
    for task in tasks:
        s = stat(r[key] for r in rows if r["task"] == task and label(r) == name)
        if s is not None:
            out[task] = s
    return out


def average(
    rows: Sequence[dict[str, Any]], name: str, tasks: Sequence[str], key: str = "test"
) -> Stat | None:
    """The task-average of ``key`` for ``name``: per seed the mean over tasks, then over seeds.

    Unseeded methods (one value per task) give a single value. None unless every task has it.
    """
    mine = [r for r in rows if label(r) == name]
    if {r["task"] for r in mine} != set(tasks):
        return None
    seeds = sorted({r.get("seed") for r in mine}, key=lambda s: -1 if s is None else s)
    per_seed = []
    for seed in seeds:
        values = [r[key] for r in mine if r.get("seed") == seed]
        if len(values) == len(tasks):
            per_seed.append(statistics.fmean(values))
    return stat(per_seed)


def gap(value: float, zero: float, top: float) -> float:
    """Share of the zero-shot → fine-tune gap: ``(acc − zero) / (top − zero)``."""
    return (value - zero) / (top - zero) if top != zero else float("nan")


def method_order(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Method names in the order they first appear."""
    return list(dict.fromkeys(label(r) for r in rows))


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def grid_grown(result: dict[str, Any]) -> bool:
    """Whether ``result`` ran with the α grid that grows past 2 (a row tried or chose a larger α)."""
    rows = result["rows"]
    curves = [r["validation_by_alpha"] for r in rows if isinstance(r.get("validation_by_alpha"), dict)]
    tried = (a for curve in curves for a in curve)
    return any(float(a) > 2 for a in tried) or any(float(r.get("alpha") or 0) > 2 for r in rows)


def grid_note(result: dict[str, Any]) -> str | None:
    """A note when ``result`` ran before the α grid grew past 2 and some of its rows chose 2."""
    at_top = sum(r.get("alpha") == 2.0 for r in result["rows"])
    if grid_grown(result) or not at_top:
        return None
    return (
        f"α grid up to 2 here (run before the grid grew past 2 when 2 wins): {at_top} row(s) chose "
        "α = 2, where a larger step might do better."
    )
