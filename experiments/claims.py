"""Checks, with the numbers, of the paper's claims and of the default transport, from the raw results."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aggregate import average, by_task, gap, label, load, md_table, stat, table1_rows

DEFAULT_KS = (1, 2, 5)


def _avg(result: dict[str, Any], name: str) -> float | None:
    rows = table1_rows(result)
    s = average(rows, name, list(result["tasks"]))
    return s.mean if s else None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


SHOT_RULES = ("adaptive (shots, min loss)", "adaptive (shots, 1-SE)")


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
        "shots, min loss",
        "shots, 1-SE (CLI default)",
        "validation ≥ better?",
        "1-SE ≥ better?",
    ]
    table: list[list[str]] = []
    within: dict[str, list[bool]] = {rule: [] for rule in SHOT_RULES}
    diffs: dict[str, list[float]] = {rule: [] for rule in SHOT_RULES}
    for result in results:
        naive = _avg(result, "naive")
        for k in DEFAULT_KS:
            gradfix = _avg(result, f"GradFix k={k}")
            if gradfix is None or naive is None:
                continue
            better = max(naive, gradfix)
            names = ("gate t=0.2", "gate t=0.4", "adaptive (validation)", *SHOT_RULES)
            cells = [_avg(result, f"{m} k={k}") for m in names]
            verdicts = [
                "yes" if c is not None and c >= better - 1e-9 else ("**no**" if c is not None else "n/a")
                for c in (cells[2], cells[4])
            ]
            table.append(
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
        rows = table1_rows(result)
        for row in rows:
            if label(row).split(" k=")[0] not in SHOT_RULES:
                continue
            twin = [
                r
                for r in rows
                if r["method"] == "adaptive (validation)"
                and r["task"] == row["task"]
                and r.get("k") == row.get("k")
                and r.get("seed") == row.get("seed")
            ]
            if twin:
                rule = label(row).split(" k=")[0]
                within[rule].append(twin[0]["validation"] - row["validation"] <= 0.01 + 1e-9)
                diffs[rule].append(row["test"] - twin[0]["test"])
    text = [
        "Test accuracy (%, mean over tasks and seeds). *gate t* drops a coordinate of τ_A only when B's "
        "votes oppose its sign by a net share ≥ t (t = 0 is GradFix); *adaptive* chooses t ∈ {0, 0.2, "
        "0.4, naive} and α ∈ {0, 0.25, 0.5, 1, 1.5, 2} together: on the validation split, or from the "
        "shots alone by 2-fold cross-validation of the loss over the shots, either its plain minimum "
        "or the one-standard-error rule with the accuracy guard (the smallest update within one "
        "standard error of the lowest held-out loss, never less accurate on the held-out shots than "
        "B): what `gradfix transport` does without `--validation`.",
        "",
        md_table(header, table),
        "",
    ]
    for rule in SHOT_RULES:
        if within[rule]:
            share = sum(within[rule]) / len(within[rule])
            text.append(
                f"- {rule}: in {100 * share:.0f} % of {len(within[rule])} runs (every task, k and seed) "
                "its candidate's validation accuracy is within 1 point of the best candidate's (the "
                "validation choice); its test accuracy is on average "
                f"{100 * statistics.fmean(diffs[rule]):+.1f} points from the validation choice's."
            )
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
                m: statistics.fmean(s.std for s in by_task(rows, m).values())
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
    for multi in load(raw, "multisource-"):
        rows = multi["rows"]
        for method in ("ties", "task_arithmetic"):
            naive = stat(r["test"] for r in rows if r.get("merge") == method and r["method"] == "naive merge")
            masked = stat(
                r["test"]
                for r in rows
                if r.get("merge") == method and r["method"] == "GradFix mask-then-merge"
            )
            if naive and masked:
                out.append(
                    f"- *mask-then-merge recovers multi-source merging* ({multi['scenario']}, {method}): "
                    f"GradFix mask-then-merge {_pct(masked.mean)} vs the naive merge {_pct(naive.mean)}: "
                    f"{_verdict(masked.mean >= naive.mean)}."
                )
    return "\n".join(out) if out else "(no results yet)"


def _mask_claims(result: dict[str, Any]) -> list[str]:
    rows = result["rows"]

    def mean_curve(method: str, signs: str) -> list[float]:
        mine = [r for r in rows if r["method"] == method and r["signs"] == signs]
        return [statistics.fmean(r["test_curve"][i] for r in mine) for i in range(len(mine[0]["alphas"]))]

    alphas = rows[0]["alphas"]
    majority, mean = mean_curve("agreement", "majority"), mean_curve("agreement", "mean")
    wins = sum(a > b for a, b, x in zip(majority, mean, alphas, strict=True) if x > 0)
    positive = sum(1 for x in alphas if x > 0)
    best = {  # over α > 0 (α = 0 is B itself for every mask)
        (m, s): max(mean_curve(m, s)[1:])
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
        f"- *agreement > forcing with estimated signs* ({name}; best over α > 0): {_pct(agree_est)} vs "
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
