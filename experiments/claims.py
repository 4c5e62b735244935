"""Checks, with the numbers, of the paper's claims and of the default transport, from the raw results."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aggregate import average, by_task, gap, label, load, md_table, stat, table1_rows

DEFAULT_KS = (1, 2, 5)


def mean_of(result: dict[str, Any], name: str) -> float | None:
    rows = table1_rows(result)
    s = average(rows, name, list(result["tasks"]))
    return s.mean if s else None


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


SHOT_RULES = ("adaptive (shots, min loss)", "adaptive (shots, 1-SE)")
DEFAULT_ROW = "adaptive (shots, no-harm)"
"""The row of what `gradfix transport` does without `--validation` (the no-harm rule)."""
FINETUNE_DEFAULT_ROW = "adaptive (shots, no-harm, fine-tune signs)"
"""The same choice on the signs of B's few-shot fine-tune (``--signs auto`` on a weak verdict)."""
CONTROL_ROWS = (
    "control: random task vector, same votes",
    "control: sign step",
    "control: shuffled |τ_A|, GradFix signs",
)
KNOWLEDGE_MARGIN = 0.05
"""GradFix carries A's knowledge when it closes this much more of the gap than both controls
without τ_A's values (the same votes on a random task vector, and the sign step)."""


def grid_of(results: Sequence[dict[str, Any]]) -> str:
    """The α grid of the sweeps in ``results``, read from their rows (``"0, 0.25, …"``)."""
    for result in results:
        for row in result["rows"]:
            if "validation_by_alpha" in row:
                return ", ".join(row["validation_by_alpha"])
    return "n/a"


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
        naive = mean_of(result, "naive")
        for k in DEFAULT_KS:
            gradfix = mean_of(result, f"GradFix k={k}")
            if gradfix is None or naive is None:
                continue
            better = max(naive, gradfix)
            names = ("gate t=0.2", "gate t=0.4", "adaptive (validation)", *SHOT_RULES)
            cells = [mean_of(result, f"{m} k={k}") for m in names]
            verdicts = [
                "yes" if c is not None and c >= better - 1e-9 else ("**no**" if c is not None else "n/a")
                for c in (cells[2], cells[4])
            ]
            table.append(
                [
                    result["scenario"],
                    str(k),
                    pct(naive),
                    pct(gradfix),
                    pct(better),
                    *(pct(c) for c in cells),
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
        f"0.4, naive}} and α ∈ {{{grid_of(results)}}} together: on the validation split, or from the "
        "shots alone by 2-fold cross-validation of the loss over the shots, either its plain minimum "
        "or the one-standard-error rule with the accuracy guard (the smallest update within one "
        "standard error of the lowest held-out loss, never less accurate on the held-out shots than "
        "B). What `gradfix transport` now does without `--validation` (the no-harm rule, on a finer "
        "grid) is measured in the next section.",
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


def _knowledge(results: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], int, list[float], float]]:
    """Per result and k with the controls: the gap shares of GradFix and the three controls, and
    GradFix's lead over the better control without τ_A's values."""
    out = []
    for result in results:
        zero, top = mean_of(result, "zero-shot B"), mean_of(result, "fine-tuned B")
        for k in DEFAULT_KS:
            values = [
                mean_of(result, f"GradFix k={k}"),
                *(mean_of(result, f"{c} k={k}") for c in CONTROL_ROWS),
            ]
            if zero is None or top is None or None in values:
                continue
            share = [gap(v, zero, top) for v in values if v is not None]
            out.append((result, k, share, share[0] - max(share[1], share[2])))
    return out


def knowledge_claims(results: Sequence[dict[str, Any]]) -> list[str]:
    """*GradFix carries A's knowledge*, per scenario and k, against the controls (where they exist)."""
    return [
        f"- *GradFix carries A's knowledge* ({result['scenario']}, {result['experiment']}, k={k}): "
        f"GradFix closes {100 * share[0]:.0f} % of the gap; the same votes on a random task "
        f"vector {100 * share[1]:.0f} %, the sign step {100 * share[2]:.0f} %, τ_A's magnitudes "
        f"shuffled under GradFix's signs {100 * share[3]:.0f} %: "
        f"{_verdict(ahead >= KNOWLEDGE_MARGIN)} (GradFix {100 * ahead:+.0f} points of the gap "
        f"ahead of the better control without τ_A's values; needs ≥ {100 * KNOWLEDGE_MARGIN:.0f})."
        for result, k, share, ahead in _knowledge(results)
    ]


def knowledge_regimes(results: Sequence[dict[str, Any]]) -> list[str]:
    """One line per scenario (regime): at which k *GradFix carries A's knowledge* holds, by how much."""
    regimes: dict[str, list[str]] = {}
    for result, k, share, ahead in _knowledge(results):
        regime = f"{result['scenario']} (drift {100 * result.get('drift', float('nan')):.2f} %)"
        regimes.setdefault(regime, []).append(
            f"k={k} ({result['experiment']}): {_verdict(ahead >= KNOWLEDGE_MARGIN)}, GradFix "
            f"{100 * share[0]:.0f} % vs {100 * max(share[1], share[2]):.0f} %"
        )
    return [
        f"- *GradFix carries A's knowledge* on {regime}: {'; '.join(cells)} of the gap (GradFix vs the "
        "better control without τ_A's values)."
        for regime, cells in regimes.items()
    ]


def claims_section(results: Sequence[dict[str, Any]], raw: Path) -> str:
    """The paper's qualitative claims, each checked on every scenario that has the numbers."""
    measured = [*results, *load(raw, "floors-"), *load(raw, "controls-")]
    out = knowledge_regimes(measured) + knowledge_claims(measured)
    for result in results:
        zero, top = mean_of(result, "zero-shot B"), mean_of(result, "fine-tuned B")
        naive, gf5 = mean_of(result, "naive"), mean_of(result, "GradFix k=5")
        ft1, ftt = mean_of(result, "few-shot FT, 1 step k=5"), mean_of(result, "few-shot FT, tuned k=5")
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
                f"{pct(gf5)} (spread {100 * spread['GradFix k=5']:.1f}) vs one step {pct(ft1)} (spread "
                f"{100 * spread['few-shot FT, 1 step k=5']:.1f}), tuned steps {pct(ftt)}: "
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
            f"{best[0]} ({pct(means[best])}); merge-then-mask: "
            + ", ".join(f"{m} {pct(v)}" for (m, p), v in means.items() if p == "merge-then-mask")
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
                    f"GradFix mask-then-merge {pct(masked.mean)} vs the naive merge {pct(naive.mean)}: "
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
        f"- *agreement > forcing with estimated signs* ({name}; best over α > 0): {pct(agree_est)} vs "
        f"{pct(force_est)}: {_verdict(agree_est > force_est)}; *forcing > agreement with the oracle*: "
        f"{pct(force_orc)} vs {pct(agree_orc)}: {_verdict(force_orc > agree_orc)}.",
    ]
    for method in ("magnitude", "random"):
        if any(r["method"] == method for r in rows):
            value = max(mean_curve(method, "majority")[1:])
            lines.append(
                f"- *{method} mask ≈ zero-shot* ({name}): best over α > 0 {pct(value)} vs zero-shot "
                f"{pct(zero)}: {_verdict(abs(value - zero) <= 0.02)}."
            )
    return lines
