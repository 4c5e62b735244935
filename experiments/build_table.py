"""The results page's section on how a scenario's numbers depend on its build (``build-spread-*.json``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aggregate import gap, load, md_table

REFERENCES = ("zero-shot B", "fine-tuned B", "naive", "oracle mask")


def _cells(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Zero-shot B, fine-tuned B, naive and the oracle (with α and gap share) of one build."""
    by = {r["method"]: r for r in rows if r["method"] in REFERENCES}
    if any(m not in by for m in REFERENCES):
        return []
    zero, top = by["zero-shot B"]["test"], by["fine-tuned B"]["test"]
    out = [f"{100 * zero:.1f}", f"{100 * top:.1f}"]
    for m in ("naive", "oracle mask"):
        r = by[m]
        out.append(
            f"{100 * r['test']:.1f} ({100 * gap(r['test'], zero, top):.0f} %, α = {r.get('alpha', 0):g})"
        )
    return out


def build_spread_section(raw: Path, table1: Sequence[dict[str, Any]]) -> str:
    """One table per scenario: each build's drift and references, and the Table 1 run's build."""
    parts = []
    for result in load(raw, "build-spread-"):
        scenario, task = result["scenario"], result["tasks"][0]
        header = ["build (threads:cache)", "threads that built B", "drift", "zero-shot B", "fine-tuned B",
                  "naive (gap, α)", "oracle mask (gap, α)"]  # fmt: skip
        body = []
        for spec in dict.fromkeys(r["build"] for r in result["rows"]):
            rows = [r for r in result["rows"] if r["build"] == spec and r.get("task") == task]
            cells = _cells(rows)
            if cells:
                body.append(
                    [spec, str(rows[0].get("build_threads")), f"{100 * rows[0]['drift']:.2f} %", *cells]
                )
        for t1 in (r for r in table1 if r["scenario"] == scenario and task in r["tasks"]):
            cells = _cells([r for r in t1["rows"] if r.get("task") == task and r.get("seed") is None])
            if cells:
                body.append(
                    ["the Table 1 run's build (earlier)", "n/a", f"{100 * t1['drift']:.2f} %", *cells]
                )
        if not body:
            continue
        parts += [
            f"**{scenario}** ({task}): the same recipe and seeds built again; only the floating-point "
            "order of the training differs (threads, machine). Test accuracy, α on validation.",
            "",
            md_table(header, body),
            "",
            *_repeats(body),
            f"`{result['command']}`",
            "",
        ]
    return "\n".join(parts)


def _repeats(body: Sequence[list[str]]) -> list[str]:
    """A line naming the builds with the same thread count whose rows are identical (a rebuild on
    one machine and thread count reproduces B) or differ."""
    groups: dict[str, list[list[str]]] = {}
    for row in body:
        if row[1] != "n/a":
            groups.setdefault(row[1], []).append(row)
    lines = []
    for threads, rows in groups.items():
        if len(rows) > 1:
            same = all(r[2:] == rows[0][2:] for r in rows)
            what = "gave identical rows" if same else "differ"
            names = ", ".join(r[0] for r in rows)
            lines.append(f"Builds with {threads} thread(s) on this machine ({names}) {what}.")
    return [" ".join(lines), ""] if lines else []
