"""`gradfix check`'s verdicts against what the experiments show: the results page's table.

Reads the records of :mod:`verdicts` (``<raw>/verdicts/<scenario>/<task>-k<k>-s<seed>.json``)
and, for each, the experiments on the same models: the raw Table 1, controls and floors results
of its scenario whose drift equals the check's (a result measured on an earlier build of the
scenario is left out and named). Shares are of the zero-shot → fine-tuned-B gap of that result,
with α on validation: naive addition (unseeded), GradFix at the check's k and seed, TransFusion.

A recommendation **matches** the experiments when:

- ``naive`` (verdict ``transfers``): naive addition closes at least half of the gap
  (:data:`TRANSFERS_SHARE`);
- ``transfusion`` (verdict ``permutation``): TransFusion closes more of the gap than naive addition;
- ``fine-tune B`` (verdict ``nothing-transfers``): naive addition closes less than a tenth of the
  gap (:data:`NOTHING_SHARE`), and GradFix too, or no more than the best control of the same k
  and seed (within :data:`CONTROL_MARGIN`: its gain is B's own sign step, not A's knowledge);
- ``adaptive`` (verdict ``weak``, or ``transfers`` where the whole of τ_A points uphill): the
  better of naive addition and GradFix closes at least a tenth of the gap (something carries over
  for the adaptive choice to take).

A run whose experiments lack the row its rule reads (TransFusion not measured) is not judged.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aggregate import gap, load, md_table
from controls import CONTROLS

TRANSFERS_SHARE = 0.5
"""``naive`` is right when naive addition closes at least this share of the gap."""
NOTHING_SHARE = 0.10
"""``fine-tune B`` is right when naive addition and GradFix both close less than this share;
``adaptive`` when the better of them closes at least this much."""
CONTROL_MARGIN = 0.05
"""GradFix within this share of the gap of the best control carries nothing of A's."""
DRIFT_TOLERANCE = 1e-4
"""Relative difference of drift under which a result was measured on the check's models."""
RESULT_PREFIXES = ("table1-", "controls-", "floors-")


def load_checks(raw: Path) -> list[dict[str, Any]]:
    """Every record of :mod:`verdicts` under ``raw/verdicts``, by scenario, task, k and seed."""
    paths = sorted((raw / "verdicts").glob("*/*.json"))
    checks = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
    return sorted(checks, key=lambda c: (c["scenario"], c["task"], c["k"], c["seed"]))


def same_build(result: dict[str, Any], drift: float) -> bool:
    """Whether ``result`` was measured on the models the check read (equal drift of B from A)."""
    return abs(result.get("drift", -1.0) - drift) <= DRIFT_TOLERANCE * max(abs(drift), 1e-12)


def references(raw: Path, scenario: str, drift: float) -> tuple[list[dict[str, Any]], list[str]]:
    """The scenario's results on the check's build (Table 1 first), and those left out (names)."""
    found = [r for p in RESULT_PREFIXES for r in load(raw, p) if r.get("scenario") == scenario]
    kept = [r for r in found if same_build(r, drift)]
    dropped = [
        f"{r['experiment']} (drift {100 * r['drift']:.2f} %)" for r in found if not same_build(r, drift)
    ]
    return kept, dropped


def _rows(result: dict[str, Any], task: str, method: str, **match: Any) -> list[dict[str, Any]]:
    return [
        r
        for r in result["rows"]
        if r.get("task") == task
        and r.get("method") == method
        and "test" in r
        and "study" not in r
        and all(r.get(key) == value for key, value in match.items())
    ]


def share(results: Sequence[dict[str, Any]], task: str, method: str, **match: Any) -> float | None:
    """Mean gap share of ``method`` on ``task`` (rows matching ``match``) in the first result that
    has it, measured against that result's own zero-shot and fine-tuned B."""
    for result in results:
        rows = _rows(result, task, method, **match)
        zero, top = _rows(result, task, "zero-shot B"), _rows(result, task, "fine-tuned B")
        if rows and zero and top:
            return gap(statistics.fmean(r["test"] for r in rows), zero[0]["test"], top[0]["test"])
    return None


def shares(results: Sequence[dict[str, Any]], task: str, k: int, seed: int) -> dict[str, float | None]:
    """Naive, GradFix (this k and seed, else the mean over seeds at k), TransFusion and the best
    control (this k and seed) gap shares."""
    gradfix = share(results, task, "GradFix", k=k, seed=seed)
    controls = [share(results, task, f"control: {name}", k=k, seed=seed) for name in CONTROLS]
    measured = [c for c in controls if c is not None]
    return {
        "naive": share(results, task, "naive"),
        "GradFix": gradfix if gradfix is not None else share(results, task, "GradFix", k=k),
        "TransFusion": share(results, task, "TransFusion"),
        "control": max(measured) if measured else None,
    }


def matches(recommended: str, s: dict[str, float | None]) -> bool | None:
    """Whether the recommendation agrees with the experiments' shares (None: not measured)."""
    naive, gradfix, transfusion = s["naive"], s["GradFix"], s["TransFusion"]
    if naive is None:
        return None
    if recommended == "naive":
        return naive >= TRANSFERS_SHARE
    if recommended == "transfusion":
        return None if transfusion is None else transfusion > naive
    better = max(naive, gradfix) if gradfix is not None else naive
    if recommended == "fine-tune B":
        control = s.get("control")
        sign_step = gradfix is not None and control is not None and gradfix <= control + CONTROL_MARGIN
        return naive < NOTHING_SHARE and (better < NOTHING_SHARE or sign_step)
    if recommended == "adaptive":
        return better >= NOTHING_SHARE
    return None


def judged(raw: Path) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """Every check with its experiments' shares and match; the results left out per scenario."""
    out, left_out = [], {}
    cache: dict[str, tuple[list[dict[str, Any]], list[str]]] = {}
    for check in load_checks(raw):
        name = check["scenario"]
        if name not in cache:
            cache[name] = references(raw, name, check["drift"])
            left_out[name] = cache[name][1]
        s = shares(cache[name][0], check["task"], check["k"], check["seed"])
        out.append({**check, "shares": s, "match": matches(check["recommended_method"], s)})
    return out, left_out


def _pct(values: Sequence[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{100 * statistics.fmean(known):.0f} %" if known else "n/a"


def _counts(items: Sequence[str]) -> str:
    return ", ".join(f"{name} × {n}" for name, n in Counter(items).items())


def verdicts_section(raw: Path) -> str:
    """The table: one row per scenario × k, with verdict counts, the experiments and the match."""
    checks, left_out = judged(raw)
    if not checks:
        return "(no verdicts measured yet)"
    header = [
        "scenario",
        "drift",
        "k",
        "tasks",
        "verdicts (tasks × seeds)",
        "recommended",
        "naive / GradFix / TransFusion (gap)",
        "matches",
    ]
    body, total, hits = [], 0, 0
    for key in dict.fromkeys((c["scenario"], c["k"]) for c in checks):
        mine = [c for c in checks if (c["scenario"], c["k"]) == key]
        marks = [c["match"] for c in mine if c["match"] is not None]
        total, hits = total + len(marks), hits + sum(marks)
        row_shares = [[c["shares"][m] for c in mine] for m in ("naive", "GradFix", "TransFusion")]
        match = "n/a" if not marks else ("yes" if all(marks) else ("**no**" if not any(marks) else "partly"))
        body.append(
            [
                key[0],
                f"{100 * mine[0]['drift']:.2f} %",
                str(key[1]),
                ", ".join(dict.fromkeys(c["task"] for c in mine)),
                _counts([c["verdict"] for c in mine]),
                _counts([c["recommended_method"] for c in mine]),
                " / ".join(_pct(v) for v in row_shares),
                f"{match} ({sum(marks)} of {len(marks)})",
            ]
        )
    text = [
        "Before a transport, `gradfix check` reads A, A's fine-tune, B and the shots and recommends a "
        "method; here each recommendation is set against what the experiments on the same models then "
        f"show (α on validation, share of the zero-shot → fine-tuned-B gap). A recommendation matches "
        f"when: **naive** — naive addition closes ≥ {100 * TRANSFERS_SHARE:.0f} % of the gap; "
        "**transfusion** — TransFusion closes more than naive addition; **fine-tune B** — naive "
        f"addition closes < {100 * NOTHING_SHARE:.0f} %, and GradFix too or no more than the best "
        f"control of the same k and seed (+{100 * CONTROL_MARGIN:.0f} points: B's own sign step); "
        "**adaptive** — the better of "
        f"them closes ≥ {100 * NOTHING_SHARE:.0f} %. Each check draws its own k shots per class with "
        "the seed (seeds 0-2); the GradFix share is that k and seed's.",
        "",
        md_table(header, body),
        "",
        f"Overall: the verdict matches the experiments in **{hits} of {total}** checks "
        f"({100 * hits / max(total, 1):.0f} %).",
    ]
    return "\n".join(text + _notes(raw, checks, left_out))


def _notes(raw: Path, checks: Sequence[dict[str, Any]], left_out: dict[str, list[str]]) -> list[str]:
    notes = [""]
    for source in dict.fromkeys(c["source"] for c in checks):
        names = ", ".join(dict.fromkeys(c["scenario"] for c in checks if c["source"] == source))
        notes.append(f"- {names}: {source}.")
    for scenario in dict.fromkeys(c["scenario"] for c in checks):
        seeds = sorted({c["seed"] for c in checks if c["scenario"] == scenario})
        notes.append(f"- {scenario}: seeds {', '.join(map(str, seeds))} checked.")
    same = [c["same_shots_as_experiments"] for c in checks if c.get("same_shots_as_experiments") is not None]
    if same:
        notes.append(
            f"- In {sum(same)} of {len(same)} checks the shots are the training examples the experiments "
            "drew for that k and seed."
        )
    for scenario, dropped in left_out.items():
        if dropped:
            notes.append(
                f"- {scenario}: left out as measured on another build of the scenario: {', '.join(dropped)}."
            )
    misses = [c for c in checks if c["match"] is False]
    for c in misses:
        s = ", ".join(f"{m} {_pct([v])}" for m, v in c["shares"].items() if v is not None)
        notes.append(
            f"- no match: {c['scenario']} / {c['task']}, k = {c['k']}, seed {c['seed']}: "
            f"{c['verdict']} → {c['recommended_method']}, while {s} of the gap."
        )
    skipped = raw / "verdicts" / "skipped.json"
    if skipped.exists():
        for where, why in json.loads(skipped.read_text(encoding="utf-8")).items():
            notes.append(f"- not checked: {where} ({why}).")
    notes.append(
        "- Command: `nice -n 19 python experiments/verdicts.py` (records in `docs/results/raw/verdicts/`)."
    )
    return notes
