"""The results page's note on fine-tune signs from several fine-tunes summed (raw ``runs*-*.json``).

A run of ``autochoice.py --signs finetune --finetune-runs N`` is set beside the floors run of the
same scenario and build (one fine-tune per estimate): the fine-tune-sign mask with α on
validation, and the shots-only default on those signs, per k, as test accuracy and as a share of
the naive → oracle margin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aggregate import load, md_table
from claims import FINETUNE_DEFAULT_ROW
from estimator_table import margin_share, mean_test

SIGNS_ROW = "fine-tune signs"


def _cell(value: float | None, naive: float, oracle: float) -> str:
    if value is None:
        return "n/a"
    share = margin_share(value, naive, oracle)
    return f"{100 * value:.1f}" + ("" if share is None else f" ({100 * share:.0f} %)")


def runs_rows(several: dict[str, Any], single: dict[str, Any]) -> list[list[str]]:
    """Per k: the mask on one fine-tune's signs and on ``N`` summed (α on validation), then the
    default on each; the margin shares read this run's naive and oracle rows."""
    naive, oracle = mean_test(several["rows"], "naive"), mean_test(several["rows"], "oracle mask")
    if naive is None or oracle is None:
        return []
    table = []
    for k in several.get("ks", ()):
        cells = [
            mean_test(result["rows"], method, k)
            for method in (SIGNS_ROW, FINETUNE_DEFAULT_ROW)
            for result in (single, several)
        ]
        table.append([str(k), *(_cell(v, naive, oracle) for v in cells)])
    return table


def runs_section(raw: Path) -> str:
    """One table per run with several fine-tunes summed, beside its scenario's floors run of the
    same build; empty when there is none."""
    parts = []
    for several in load(raw, "runs"):
        n = several.get("finetune_runs", 1)
        same = [
            f
            for f in load(raw, f"floors-{several['scenario']}-")
            if abs(f.get("drift", -1) - several.get("drift", -2)) < 1e-9
        ]
        if n < 2 or not same or not (table := runs_rows(several, same[0])):
            continue
        header = ["k", "fine-tune signs, 1 run", f"{n} runs", "default (shots), 1 run", f"{n} runs"]
        parts += [
            f"**{n} fine-tunes summed** ({several['scenario']}, drift {100 * several['drift']:.2f} %; "
            f"one fine-tune: {same[0]['experiment']}): test accuracy (share of the naive → oracle "
            "margin); the masks with α on validation, the default from the shots.",
            "",
            md_table(header, table),
            "",
            f"`{several['command']}`",
            "",
        ]
    return "\n".join(parts)
