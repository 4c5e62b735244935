"""The results page's section on sign estimators beyond the majority vote (raw ``estimators-*.json``).

Each row is one estimator at one k, mean test accuracy over the seeds with α on validation, as a
share of the zero-shot → fine-tuned-B gap and as a share of the **margin** between naive addition
and the oracle mask (``(x − naive) / (oracle − naive)``: what a better sign estimate takes of the
room the oracle shows). The shots-only default of the same scenario (``floors-<scenario>-*``,
rule ``no-harm``) is set beside them: the aim is that it takes at least half of that margin.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aggregate import gap, grid_grown, grid_note, load, md_table
from claims import DEFAULT_ROW, FINETUNE_DEFAULT_ROW

INTRO = """Each estimator's update is τ_A masked by its signs (or weighted, for the confidence mask), α
on validation; the two *adaptive (shots, …)* rows choose t and α from the shots alone, on B's
votes and on the signs of B's own fine-tune. *fine-tune signs*: the signs of θ_N − θ_B after 120
full-batch AdamW steps (learning rate 10⁻⁴) of B on the shots (`gradfix.votes.finetune_signs`);
*majority vote, many labelled shots*: GradFix's vote on 100 labelled examples per class; *votes at
the transported point*: the vote taken at θ_B + τ_A. The aim is the default taking at least half
of the naive → oracle margin."""


def mean_test(rows: Sequence[dict[str, Any]], method: str, k: int | None = None) -> float | None:
    """The mean test accuracy of ``method`` at ``k`` over the rows that have one (``None``: none)."""
    values = [r["test"] for r in rows if r["method"] == method and r.get("k") == k and "test" in r]
    return statistics.fmean(values) if values else None


def margin_share(value: float, naive: float, oracle: float) -> float | None:
    """``(value − naive) / (oracle − naive)``; None when the oracle is no better than naive."""
    return (value - naive) / (oracle - naive) if oracle > naive else None


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.0f} %"


def estimator_rows(result: dict[str, Any], defaults: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Table rows of one estimators run (one task): every method at every k, then the default."""
    rows = result["rows"]
    zero, top = mean_test(rows, "zero-shot B"), mean_test(rows, "fine-tuned B")
    naive, oracle = mean_test(rows, "naive"), mean_test(rows, "oracle mask")
    if zero is None or top is None or naive is None or oracle is None:
        return []
    methods = ["GradFix", *sorted({r["method"] for r in rows if r["method"].startswith("estimator: ")})]
    if any(r["method"] == DEFAULT_ROW for r in rows):  # measured in this run: same build and grid
        default_rows = rows
    else:
        same_grid = [d for d in defaults if grid_grown(d) == grid_grown(result)]  # margins of one grid
        default_rows = [r for d in same_grid for r in d["rows"] if r.get("task") in result["tasks"]]
    if default_rows:
        methods.append(DEFAULT_ROW)
    if any(r["method"] == FINETUNE_DEFAULT_ROW for r in rows):
        methods.append(FINETUNE_DEFAULT_ROW)
    out = []
    for method in methods:
        source = default_rows if method == DEFAULT_ROW else rows
        for k in [*result["ks"], *result.get("extra_ks", [])]:
            value = mean_test(source, method, k)
            if value is None:
                continue
            shown = method.removeprefix("estimator: ")
            out.append(
                [
                    shown,
                    str(k),
                    f"{100 * value:.1f}",
                    _pct(gap(value, zero, top)),
                    _pct(margin_share(value, naive, oracle)),
                ]
            )
    return out


def estimators_section(raw: Path) -> str:
    """The section: one table per estimators run, with its references and command."""
    parts = []
    for result in load(raw, "estimators-"):
        defaults = load(raw, f"floors-{result['scenario']}-")
        rows = result["rows"]
        ref = {m: mean_test(rows, m) for m in ("zero-shot B", "fine-tuned B", "naive", "oracle mask")}
        if None in ref.values():
            continue
        parts += [
            f"**{result['scenario']}** ({', '.join(result['tasks'])}; drift {100 * result['drift']:.2f} %; "
            f"seeds {', '.join(map(str, result['seeds']))}): zero-shot B {100 * ref['zero-shot B']:.1f}, "
            f"fine-tuned B {100 * ref['fine-tuned B']:.1f}, naive {100 * ref['naive']:.1f}, oracle mask "
            f"{100 * ref['oracle mask']:.1f} (test, α on validation).",
            "",
            md_table(
                ["estimator", "k", "test", "gap closed", "of the naive → oracle margin"],
                estimator_rows(result, defaults),
            ),
            "",
            *([note, ""] if (note := grid_note(result)) else []),
            *(
                [
                    "The shots-only default was measured again with the grown grid (floors and Table 1 "
                    "sections); set against this run's naive and oracle rows its share of the margin "
                    "would mix two grids, so it is not listed here.",
                    "",
                ]
                if any(grid_grown(d) != grid_grown(result) for d in defaults)
                and not any(r["method"] == DEFAULT_ROW for r in rows)
                else []
            ),
            *_build_note(result, load(raw, f"table1-{result['scenario']}"), raw),
            f"`{result['command']}`",
            "",
        ]
    if not parts:
        return "No estimators run yet (`python experiments/estimators.py --scenario ...`)."
    return "\n".join([INTRO, "", *parts])


def _build_note(result: dict[str, Any], table1: Sequence[dict[str, Any]], raw: Path) -> list[str]:
    """A line when this run measured another build of the scenario than its Table 1 run (drifts differ)."""
    others = [t for t in table1 if t.get("scenario") == result["scenario"] and t.get("drift") is not None]
    if not others or abs(others[0]["drift"] - result["drift"]) < 1e-5:
        return []
    return [
        "Measured on another build of the scenario than its Table 1 run (drift "
        f"{100 * result['drift']:.2f} % here, {100 * others[0]['drift']:.2f} % there): compare rows "
        "within this table"
        + (
            "; the section *The same release built again* sets the builds side by side."
            if (raw / f"build-spread-{result['scenario']}.json").exists()
            else "."
        ),
        "",
    ]
