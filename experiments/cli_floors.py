"""The floors of the default, measured through the installed command (``experiments/cli_default.sh``).

``cli-default-<scenario>.txt`` holds one line per run of ``gradfix transport`` without
``--validation`` (``k=2 seed=0 test_accuracy=0.8602 aligned_by=transfusion verdict=permutation
t=2.0 alpha=2.0``); the references (zero-shot B, naive and GradFix with α on validation) come from
the scenario's Table 1 run on the same shots. Unlike the library path of :mod:`autochoice`, the
command follows ``gradfix check``'s verdict: on a permuted release it aligns ``τ_A`` by re-basin
before it chooses t and α.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aggregate import md_table
from claims import mean_of

NAIVE_THRESHOLD = 2.0
"""The gate threshold the records write for naive addition (no coordinate dropped)."""


def parse_runs(path: Path) -> tuple[str, list[dict[str, Any]]]:
    """The command line and the runs of one ``cli-default-*.txt`` (``key=value`` fields per line; the
    ``drift:`` line, the build's, is given to every run)."""
    command, drift, runs = "", "", []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("command:"):
            command = line.partition(":")[2].strip()
        elif line.startswith("drift:"):
            drift = line.partition(":")[2].strip()
        elif line.startswith("k="):
            runs.append(dict(field.split("=", 1) for field in line.split()))
    return command, [{"drift": drift, **r} for r in runs] if drift else runs


def same_build(
    scenario: str, runs: Sequence[dict[str, str]], results: Sequence[dict[str, Any]]
) -> dict[str, Any] | None:
    """The result of ``scenario`` measured on the build the command ran on (same drift to 10⁻⁵),
    else its first result (another build, or runs that did not record their drift)."""
    mine = [float(r["drift"]) for r in runs if r.get("drift") not in (None, "None")]
    candidates = [r for r in results if r["scenario"] == scenario and r.get("drift") is not None]
    for result in candidates:
        if mine and all(abs(d - result["drift"]) < 1e-5 for d in mine):
            return result
    return candidates[0] if candidates else None


def _shares(value: float, reference: dict[str, Any]) -> str:
    """``68 % / 61 %``: the share of the zero-shot → fine-tuned-B gap and of the naive → oracle
    margin (``n/a`` where the reference lacks the rows)."""
    zero, top = mean_of(reference, "zero-shot B"), mean_of(reference, "fine-tuned B")
    naive, oracle = mean_of(reference, "naive"), mean_of(reference, "oracle mask")
    shares = [
        f"{100 * (value - low) / (high - low):.0f} %"
        if low is not None and high is not None and high > low
        else "n/a"
        for low, high in ((zero, top), (naive, oracle))
    ]
    return " / ".join(shares)


def _shown(value: str | None) -> str:
    """A record's value, ``none`` where it wrote nothing."""
    return "none" if value in (None, "None") else value


def _drifts(runs: Sequence[dict[str, str]], reference: dict[str, Any]) -> str:
    """``12.19 % / 12.26 %``: the drift the command measured, then the Table 1 run's."""
    mine = {f"{100 * float(r['drift']):.2f} %" for r in runs if r.get("drift") not in (None, "None")}
    theirs = f"{100 * reference['drift']:.2f} %" if reference.get("drift") is not None else "n/a"
    return f"{', '.join(sorted(mine)) or 'n/a'} / {theirs}"


def _choice(run: dict[str, str]) -> str:
    """``naive α=5``, ``gate t=0.4 α=1.5`` or ``B unchanged``."""
    alpha = float(run["alpha"]) if run.get("alpha") not in (None, "None") else 0.0
    if alpha == 0:
        return "B unchanged"
    t = float(run["t"]) if run.get("t") not in (None, "None") else 0.0
    what = "naive" if t >= NAIVE_THRESHOLD else f"gate t={t:g}"
    return f"{what} α={alpha:g}"


def cli_floors_section(raw: Path, table1: Sequence[dict[str, Any]]) -> str:
    """Per scenario and k: the command's test accuracy on each seed against the floors; the references
    from the result in ``table1`` (Table 1 or estimators runs) of the build the command ran on."""
    header = [
        "scenario", "drift", "k", "default (CLI), per seed", "mean", "τ_A aligned by", "verdict", "signs",
        "choices", "zero-shot B", "naive", "GradFix", "gap / naive → oracle margin", "≥ zero-shot − 0.5",
        "≥ better − 1",
    ]  # fmt: skip
    table, commands = [], []
    for path in sorted(raw.glob("cli-default-*.txt")):
        scenario = path.stem.removeprefix("cli-default-")
        command, runs = parse_runs(path)
        reference = same_build(scenario, runs, table1)
        if not runs or reference is None:
            continue
        commands.append(f"`{command} > docs/results/raw/{path.name}`")
        zero, naive = mean_of(reference, "zero-shot B"), mean_of(reference, "naive")
        for k in sorted({int(r["k"]) for r in runs}):
            mine = [r for r in runs if int(r["k"]) == k]
            accs = [float(r["test_accuracy"]) for r in mine]
            mean, gradfix = statistics.fmean(accs), mean_of(reference, f"GradFix k={k}")
            better = max(v for v in (naive, gradfix) if v is not None) if naive is not None else None
            table.append(
                [
                    scenario, _drifts(mine, reference), str(k),
                    " / ".join(f"{100 * a:.1f}" for a in accs), f"{100 * mean:.1f}",
                    ", ".join(sorted({_shown(r.get("aligned_by")) for r in mine})),
                    ", ".join(sorted({r.get("verdict", "None") for r in mine})),
                    ", ".join(sorted({r.get("signs", "votes") for r in mine})),
                    "; ".join(_choice(r) for r in mine),
                    *(("n/a" if v is None else f"{100 * v:.1f}") for v in (zero, naive, gradfix)),
                    _shares(mean, reference),
                    "n/a" if zero is None else ("met" if mean >= zero - 0.005 else "**not met**"),
                    "n/a" if better is None else ("met" if mean >= better - 0.01 else "**not met**"),
                ]
            )  # fmt: skip
    if not table:
        return ""
    return "\n".join(
        [
            "**The default through the installed command.** `gradfix transport` without `--validation` "
            "(the verdict of `gradfix check` first: on the permuted release τ_A is aligned by re-basin "
            "before t and α are chosen), scored with `gradfix eval` on the test split; references from "
            "the scenario's run on the same build (Table 1 or the estimators run; α on validation, same "
            "shots), else its Table 1 run (*drift*: the command's, then the references'). *signs*: B's "
            "votes, or a fine-tune of B on the shots (`--signs auto` where the verdict is weak). k = 1 is "
            "not run: the command refuses to cross-validate one shot per class and asks for `--validation`.",
            "",
            md_table(header, table),
            "",
            *(f"- {c}" for c in commands),
        ]
    )
