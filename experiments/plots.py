"""The figures of the results page (PNG, matplotlib with the Agg backend)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from aggregate import average, gap, md_table, table1_rows

DRIFT_METHODS = (
    "naive",
    "GradFix k=2",
    "GradFix k=5",
    "adaptive (validation) k=2",
    "adaptive (shots, 1-SE) k=2",
    "oracle mask",
)
DRIFT_TASK = "headlines"


def _save(fig: Any, folder: Path, name: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(folder / name, dpi=110)
    plt.close(fig)
    return name


def masks_figure(result: dict[str, Any], folder: Path) -> str:
    """Test accuracy vs α per mask strategy (mean over seeds): estimated signs, oracle signs."""
    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, signs in zip(axes, ("majority", "oracle"), strict=True):
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == method and r["signs"] == signs]
            if not mine:
                continue
            alphas = mine[0]["alphas"]
            mean = [statistics.fmean(r["test_curve"][i] for r in mine) for i in range(len(alphas))]
            ax.plot(alphas, mean, marker="o", label=method)
        if signs == "majority":
            mine = [r for r in rows if r["signs"] == "mean"]
            if mine:
                alphas = mine[0]["alphas"]
                mean = [statistics.fmean(r["test_curve"][i] for r in mine) for i in range(len(alphas))]
                ax.plot(
                    alphas, mean, marker="x", linestyle="--", color="black", label="agreement, mean estimator"
                )
        ax.set_title(f"estimated (k={result['k']})" if signs == "majority" else "oracle sign(τ_B)")
        ax.set_xlabel("α")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"test accuracy ({result['tasks'][0]})")
    axes[1].legend(fontsize=8)
    fig.suptitle(result["scenario"])
    return _save(fig, folder, f"masks-{result['scenario']}.png")


def agreement_figure(result: dict[str, Any], folder: Path) -> str:
    """Heatmaps (module kind × layer) of the sign agreement of each pair, pooled over tasks."""
    rows = result["rows"]
    pairs = list(dict.fromkeys(r["pair"] for r in rows))
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    kinds = list(dict.fromkeys(r["module"] for r in rows))
    fig, axes = plt.subplots(1, len(pairs), figsize=(4 + 3 * len(pairs), 0.35 * len(kinds) + 2), sharey=True)
    for ax, pair in zip(axes, pairs, strict=True):
        grid = []
        for kind in kinds:
            line = []
            for layer in layers:
                cells = [r for r in rows if r["pair"] == pair and r["layer"] == layer and r["module"] == kind]
                total = sum(r["coordinates"] for r in cells)
                line.append(
                    sum(r["agreement"] * r["coordinates"] for r in cells) / total if total else float("nan")
                )
            grid.append(line)
        image = ax.imshow(grid, vmin=0.3, vmax=0.9, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=7)
        ax.set_yticks(range(len(kinds)), kinds, fontsize=7)
        ax.set_title(pair, fontsize=9)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="sign agreement")
    fig.suptitle(result["scenario"])
    name = f"agreement-{result['scenario']}.png"
    folder.mkdir(parents=True, exist_ok=True)
    fig.savefig(folder / name, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return name


def drift_section(results: Sequence[dict[str, Any]], folder: Path) -> str:
    """The drift curve on the headline task (gap closed vs drift), and a table of every scenario."""
    levels = []
    for result in results:
        rows = [r for r in table1_rows(result) if r["task"] == DRIFT_TASK]
        if not rows:
            continue
        zero, top = average(rows, "zero-shot B", [DRIFT_TASK]), average(rows, "fine-tuned B", [DRIFT_TASK])
        shares = {}
        for method in DRIFT_METHODS:
            s = average(rows, method, [DRIFT_TASK])
            if s and zero and top:
                shares[method] = gap(s.mean, zero.mean, top.mean)
        levels.append((result["drift"], result["scenario"], shares))
    levels.sort()
    if not levels:
        return "(no text results)"
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in DRIFT_METHODS:
        points = [(d, s[method]) for d, _, s in levels if method in s]
        if points:
            ax.plot([100 * p[0] for p in points], [100 * p[1] for p in points], marker="o", label=method)
    ax.set_xlabel("drift of B: ‖θ_B − θ_A‖ / ‖θ_A‖ (%)")
    ax.set_ylabel("share of the zero-shot → fine-tune gap (%)")
    ax.set_title(f"text scenarios, task {DRIFT_TASK} (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    name = _save(fig, folder, "drift.png")
    header = ["B", "drift", *DRIFT_METHODS]
    body = [
        [scenario, f"{100 * d:.2f} %", *(f"{100 * s[m]:.0f} %" if m in s else "" for m in DRIFT_METHODS)]
        for d, scenario, s in levels
    ]
    return (
        f"Gap closed on the {DRIFT_TASK} task at each drift level (B = A is the no-drift level: "
        f"τ_A is then B's own fine-tune). ![drift]({folder.name}/{name})\n\n" + md_table(header, body)
    )
