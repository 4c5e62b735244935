"""The floors of the shots-only default (`gradfix transport` without `--validation`), from the raw results."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aggregate import by_task, label, md_table, table1_rows
from claims import DEFAULT_KS, DEFAULT_ROW, FINETUNE_DEFAULT_ROW, grid_of, mean_of, pct

REFERENCE_ROWS = ("zero-shot B", "fine-tuned B", "naive", "oracle mask", "GradFix", "adaptive (validation)")
"""The rows the floors compare with; a floors run without them borrows them from Table 1."""


def borrow_references(result: dict[str, Any], table1: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``result`` with the reference rows taken from its scenario's Table 1 (same tasks, k and
    seeds) when it has none of its own (models rebuilt since would not compare); ``references`` in
    the result names where they come from."""
    have = {r["method"] for r in result["rows"]}
    missing = [m for m in REFERENCE_ROWS if m not in have]
    source = [t for t in table1 if t["scenario"] == result["scenario"]]
    if len(missing) < len(REFERENCE_ROWS) or not source:  # a run with its own references keeps them
        return {**result, "references": "this run"}

    def keep(r: dict[str, Any]) -> bool:
        return (
            r["method"] in missing
            and r["task"] in result["tasks"]
            and r.get("k") in (None, *result.get("ks", DEFAULT_KS))
            and r.get("seed") in (None, *result.get("seeds", ()))
            and "study" not in r
        )

    rows = [r for r in source[0]["rows"] if keep(r)]
    grid = grid_of([{"rows": rows}])
    return {**result, "rows": result["rows"] + rows, "references": f"Table 1 run (α ∈ {{{grid}}})"}


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


FINETUNE_VALIDATION_ROW = "adaptive (validation) (fine-tune signs)"


def default_rows(result: dict[str, Any], k: int) -> tuple[str, str, str]:
    """The row of the default at ``k``, its row with ``--validation``, and the signs they take: a
    run with ``--signs finetune`` (on a release whose verdict is *weak*, where the CLI's
    ``--signs auto`` takes a fine-tune of B) measured the fine-tune-sign rows, any other the votes."""
    if mean_of(result, f"{FINETUNE_DEFAULT_ROW} k={k}") is not None:
        return FINETUNE_DEFAULT_ROW, FINETUNE_VALIDATION_ROW, "fine-tune"
    return DEFAULT_ROW, "adaptive (validation)", "votes"


def _one_shot_note(k: int, what: str, validation_met: bool | None) -> str:
    """At one shot per class the command chooses only with ``--validation``: say so under a miss
    of the shots-only rows, with whether the validation row meets its floor."""
    if k != 1 or what == "adaptive (validation) − better" or validation_met is None:
        return ""
    state = "meets" if validation_met else "misses"
    return (
        " `gradfix transport` does not take this path: it refuses to cross-validate one shot per "
        f"class and asks for `--validation`, whose row here {state} its floor (≥ better)."
    )


def floors_section(results: Sequence[dict[str, Any]]) -> str:
    """The floors of the shots-only default against zero-shot B and the better of naive and GradFix."""
    header = [
        "scenario",
        "references",
        "k",
        "signs",
        "zero-shot B",
        "naive",
        "GradFix",
        "better of both",
        "adaptive (validation)",
        "default (shots, no-harm)",
        "worst task: default − zero-shot",
        "default ≥ zero-shot − 0.5",
        "default ≥ better − 1",
        "validation ≥ better",
    ]
    table, misses = [], []
    for result in results:
        name = f"{result['scenario']} ({', '.join(result['tasks'])})"
        zero, naive = mean_of(result, "zero-shot B"), mean_of(result, "naive")
        for k in result.get("ks", DEFAULT_KS):
            default_row, valid_row, signs = default_rows(result, k)
            gradfix, default = mean_of(result, f"GradFix k={k}"), mean_of(result, f"{default_row} k={k}")
            valid = mean_of(result, f"{valid_row} k={k}")
            if zero is None or naive is None or gradfix is None or default is None:
                continue
            better = max(naive, gradfix)
            rows = table1_rows(result)
            per_task = by_task(rows, f"{default_row} k={k}")
            zeros = by_task(rows, "zero-shot B")
            worst = min(per_task[t].mean - zeros[t].mean for t in per_task)
            checks = (
                default >= zero - 0.005 - 1e-9,
                default >= better - 0.01 - 1e-9,
                None if valid is None else valid >= better - 1e-9,
            )
            table.append(
                [
                    name,
                    result.get("references", "this run"),
                    str(k),
                    signs,
                    *(pct(v) for v in (zero, naive, gradfix, better, valid, default)),
                    f"{100 * worst:+.1f}",
                    *("n/a" if c is None else _met(c) for c in checks),
                ]
            )
            for ok, what, gap_ in zip(
                checks,
                ("default − zero-shot B", "default − better", "adaptive (validation) − better"),
                (default - zero, default - better, None if valid is None else valid - better),
                strict=True,
            ):
                if ok is False and gap_ is not None:
                    mine = [r for r in rows if r["method"] == default_row and r.get("k") == k]
                    kept = sum(1 for r in mine if r.get("alpha") == 0)
                    chosen = ", ".join(f"{r['alpha']:g}" for r in mine if "alpha" in r)
                    valid_alphas = ", ".join(
                        f"{r['alpha']:g}" for r in rows if label(r) == f"GradFix k={k}" and "alpha" in r
                    )
                    why = (
                        f" (α from the shots: {chosen}; GradFix's α on validation: {valid_alphas}); "
                        "the rule moves B only as far as the held-out shots show a gain on both folds "
                        "beyond one standard error"
                        if what == "default − better"
                        else ""
                    )
                    misses.append(
                        f"- {name}, k = {k}: {what} = {100 * gap_:+.1f} points; the default kept B "
                        f"(α = 0) in {kept} of {len(mine)} draws{why}.{_one_shot_note(k, what, checks[2])}"
                    )
    if not table:
        return "(no floors results yet)"
    text = [
        "Test accuracy (%, mean over tasks and seeds); the default on the CLI's grid (α ∈ "
        f"{{{', '.join(f'{a:g}' for a in results[0].get('alphas', ()))}}}, t ∈ {{0, 0.2, 0.4, naive}}), "
        "from the shots alone; naive, GradFix and adaptive (validation) choose on the validation "
        "split, on the grid of the run named under *references* (the same shots and seeds). "
        "*signs*: what the default's mask took (B's votes, or a fine-tune of B on the shots where "
        "the verdict is weak; GradFix always takes the votes).",
        "",
        md_table(header, table),
        "",
    ]
    return "\n".join(text + (["Floors not met:", *misses] if misses else ["Every floor is met."]))
