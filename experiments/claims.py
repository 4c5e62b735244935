"""Checks, with the numbers, of the paper's claims and of the default transport, from the raw results."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aggregate import average, gap, load, stat, table1_rows

DEFAULT_KS = (1, 2, 5)


def _avg(result: dict[str, Any], name: str) -> float | None:
    rows = table1_rows(result)
    s = average(rows, name, list(result["tasks"]))
    return s.mean if s else None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def default_section(results: Sequence[dict[str, Any]]) -> str:
    """Adaptive transport against the better of naive addition and GradFix, per scenario and k."""
    header = [
        "scenario",
        "k",
        "naive",
        "GradFix",
        "better of both",
        "gate t=0.2",
        "gate t=0.4",
        "adaptive (validation)",
        "adaptive (shots)",
        "validation ≥ better?",
        "shots ≥ better?",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    regrets, diffs = [], []
    for result in results:
        naive = _avg(result, "naive")
        for k in DEFAULT_KS:
            gradfix = _avg(result, f"GradFix k={k}")
            if gradfix is None or naive is None:
                continue
            better = max(naive, gradfix)
            cells = [
                _avg(result, f"{m} k={k}")
                for m in ("gate t=0.2", "gate t=0.4", "adaptive (validation)", "adaptive (shots)")
            ]
            verdicts = ["yes" if c is not None and c >= better - 1e-9 else "**no**" for c in cells[2:]]
            lines.append(
                "| "
                + " | ".join(
                    [
                        result["scenario"],
                        str(k),
                        _pct(naive),
                        _pct(gradfix),
                        _pct(better),
                        *(_pct(c) for c in cells),
                        *verdicts,
                    ]
                )
                + " |"
            )
        for row in table1_rows(result):
            if row["method"] == "adaptive (shots)":
                regrets.append(row["validation_regret"])
                twin = [
                    r
                    for r in table1_rows(result)
                    if r["method"] == "adaptive (validation)"
                    and r["task"] == row["task"]
                    and r["k"] == row["k"]
                    and r["seed"] == row["seed"]
                ]
                if twin:
                    diffs.append(row["test"] - twin[0]["test"])
    text = [
        "Test accuracy (%, mean over tasks and seeds). *gate t* drops a coordinate of τ_A only when B's "
        "votes oppose its sign by a net share ≥ t (t = 0 is GradFix); *adaptive* chooses t ∈ {0, 0.2, "
        "0.4, naive} and α together — on the validation split, or from the shots alone (2-fold "
        "cross-validation of the loss over the shots; what `gradfix transport` does without "
        "`--validation`).",
        "",
        "\n".join(lines),
    ]
    if regrets:
        within = sum(r <= 0.01 + 1e-9 for r in regrets) / len(regrets)
        mean_diff = statistics.fmean(diffs) if diffs else float("nan")
        text += [
            "",
            f"Choice from the shots alone: in {100 * within:.0f} % of {len(regrets)} runs (every task, "
            f"k and seed) its candidate's validation accuracy is within 1 point of the best candidate's; "
            f"its test accuracy is on average {100 * mean_diff:+.1f} points from the validation choice's.",
        ]
    return "\n".join(text)


def _verdict(ok: bool) -> str:
    return "holds" if ok else "**does not hold**"


def claims_section(results: Sequence[dict[str, Any]], raw: Path) -> str:
    """The paper's qualitative claims, each checked on every scenario that has the numbers."""
    out = []
    for result in results:
        zero, top = _avg(result, "zero-shot B"), _avg(result, "fine-tuned B")
        naive, gf5 = _avg(result, "naive"), _avg(result, "GradFix k=5")
        ft1, ftt = _avg(result, "few-shot FT, 1 step k=5"), _avg(result, "few-shot FT, tuned k=5")
        name = result["scenario"]
        if None in (zero, top, naive, gf5):
            continue
        out.append(
            f"- *GradFix > naive ≈ zero-shot* ({name}): naive closes {100 * gap(naive, zero, top):.0f} % of "
            f"the gap, GradFix k=5 {100 * gap(gf5, zero, top):.0f} %: {_verdict(gf5 > naive)}."
        )
        if ft1 is not None:
            rows = table1_rows(result)
            spread = {
                m: statistics.fmean(s.std for s in _task_stats(rows, m).values())
                for m in ("GradFix k=5", "few-shot FT, 1 step k=5")
            }
            out.append(
                f"- *GradFix ≥ few-shot fine-tuning, with a smaller spread* ({name}, k=5): GradFix "
                f"{_pct(gf5)} (spread {100 * spread['GradFix k=5']:.1f}) vs one step {_pct(ft1)} (spread "
                f"{100 * spread['few-shot FT, 1 step k=5']:.1f}), tuned steps {_pct(ftt)}: "
                f"{_verdict(gf5 >= ft1 and spread['GradFix k=5'] <= spread['few-shot FT, 1 step k=5'])}."
            )
    for masks in load(raw, "masks-"):
        out += _mask_claims(masks)
    for multi in load(raw, "multitask-"):
        means = {
            (r["merge"], r["method"]): stat(
                x["test"]
                for x in multi["rows"]
                if x.get("merge") == r["merge"] and x["method"] == r["method"]
            ).mean
            for r in multi["rows"]
            if r.get("merge")
        }
        best = max(means, key=means.get)
        out.append(
            f"- *merge-then-mask is best for multi-task* ({multi['scenario']}): best is {best[1]} with "
            f"{best[0]} ({_pct(means[best])}); merge-then-mask: "
            + ", ".join(f"{m} {_pct(v)}" for (m, p), v in means.items() if p == "merge-then-mask")
            + f": {_verdict(best[1] == 'merge-then-mask')}."
        )
    return "\n".join(out) if out else "(no results yet)"


def _task_stats(rows: Sequence[dict[str, Any]], name: str) -> dict[str, Any]:
    from aggregate import by_task

    return by_task(rows, name)


def _mask_claims(result: dict[str, Any]) -> list[str]:
    rows = result["rows"]

    def mean_curve(method: str, signs: str) -> list[float]:
        mine = [r for r in rows if r["method"] == method and r["signs"] == signs]
        return [statistics.fmean(r["test_curve"][i] for r in mine) for i in range(len(mine[0]["alphas"]))]

    alphas = rows[0]["alphas"]
    majority, mean = mean_curve("agreement", "majority"), mean_curve("agreement", "mean")
    wins = sum(a > b for a, b, x in zip(majority, mean, alphas, strict=True) if x > 0)
    positive = sum(1 for x in alphas if x > 0)
    best = {
        (m, s): max(mean_curve(m, s))
        for m, s in (
            ("agreement", "majority"),
            ("forcing", "majority"),
            ("agreement", "oracle"),
            ("forcing", "oracle"),
        )
    }
    zero = majority[0]
    name = f"{result['scenario']}, {result['tasks'][0]}"
    agree_est, force_est = best[("agreement", "majority")], best[("forcing", "majority")]
    agree_orc, force_orc = best[("agreement", "oracle")], best[("forcing", "oracle")]
    lines = [
        f"- *majority vote > mean estimator over all α* ({name}): majority ahead at {wins} of {positive} "
        f"α > 0: {_verdict(wins == positive)}.",
        f"- *agreement > forcing with estimated signs* ({name}; best over α): {_pct(agree_est)} vs "
        f"{_pct(force_est)}: {_verdict(agree_est > force_est)}; *forcing > agreement with the oracle*: "
        f"{_pct(force_orc)} vs {_pct(agree_orc)}: {_verdict(force_orc > agree_orc)}.",
    ]
    for method in ("magnitude", "random"):
        if any(r["method"] == method for r in rows):
            value = max(mean_curve(method, "majority")[1:])
            lines.append(
                f"- *{method} mask ≈ zero-shot* ({name}): best over α > 0 {_pct(value)} vs zero-shot "
                f"{_pct(zero)}: {_verdict(abs(value - zero) <= 0.02)}."
            )
    return lines
