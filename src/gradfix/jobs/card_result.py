"""The outcome sections of a model card: the choice of ``(t, α)`` and the result.

:func:`choice_section` tabulates every candidate's score with the chosen one in bold;
:func:`result_section` states how much of ``τ_A`` (or of the merged update) the output adds, the
first-order descent certificate and, folded away, the per-tensor figures. Both read only the
record (:func:`gradfix.jobs.card.model_card` puts them in the card).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gradfix.jobs.card_format import num, pct, threshold_text
from gradfix.methods.autotune import candidate_key


def choice_section(choice: Mapping[str, Any] | None) -> str:
    """The chosen ``(t, α)`` and every candidate's score, as a table of t (rows) by α (columns)."""
    if not choice:
        return ""
    t, alpha = threshold_text(float(choice["threshold"])), num(choice["alpha"])
    chosen = candidate_key(float(choice["threshold"]), float(choice["alpha"]))
    cells: dict[tuple[str, str], tuple[Any, bool]] = {}
    for key, value in choice.get("scores", {}).items():
        first, _, second = str(key).partition(",")
        cells[(first.removeprefix("t="), second.removeprefix("a="))] = (value, key == chosen)
    rows = list(dict.fromkeys(k[0] for k in cells))
    columns = list(dict.fromkeys(k[1] for k in cells))
    lines = [
        "## Choice of t and α",
        "",
        f"Chosen on {choice.get('source')}: **t = {t}, α = {alpha}** (score {num(choice.get('score'))}).",
        "Scores are the accuracy on the validation file when there is one, otherwise minus the mean "
        "loss on the held-out folds of the shots; higher is better. t = 0 is GradFix's agreement mask, "
        "t = naive keeps every coordinate.",
        "",
        "| t \\ α | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for row in rows:
        values = [_score(*cells.get((row, c), (None, False))) for c in columns]
        lines.append(f"| {row} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def result_section(record: Mapping[str, Any]) -> str:
    """The kept (or merged) share, the descent certificate and the per-tensor table."""
    descent, alpha = record.get("descent"), record.get("alpha")
    lines = ["## Result", ""]
    if alpha == 0:
        why = " (no candidate beat B on the evidence)" if record.get("choice") else ""
        lines.append(f"- α = 0: the weights are B's, unchanged{why}")
    lines += _merge_shares(record) if record.get("command") == "merge" else _kept_shares(record)
    if descent:
        lines.append(_certificate(descent))
    else:
        lines.append("- no votes were taken, so there is no first-order descent certificate")
    table = _tensor_table(record)
    if table:
        lines += ["", table]
    return "\n".join(lines)


def _kept_shares(record: Mapping[str, Any]) -> list[str]:
    """How much of ``τ_A`` the mask kept (with its sign) and flipped."""
    descent = record.get("descent")
    if not descent:
        return ["- no mask: every coordinate of `τ_A` is added"] if record.get("mask") == "none" else []
    added = " (none is added at α = 0)" if record.get("alpha") == 0 else ""
    kept = pct(descent.get("kept_fraction"))
    lines = [f"- kept share: the mask keeps {kept} of `τ_A`'s non-zero coordinates{added}"]
    if descent.get("flipped_fraction"):
        lines.append(f"- flipped share: {pct(descent['flipped_fraction'])} get the opposite sign")
    return lines


def _merge_shares(record: Mapping[str, Any]) -> list[str]:
    """How much of the merged tensors the merged (and masked) update changes."""
    tensors = (record.get("descent") or {}).get("tensors") or []
    numel = sum(int(t.get("numel", 0)) for t in tensors)
    if numel:
        share = sum(max(int(t.get("nonzero", 0)), 0) for t in tensors) / numel
        return [f"- the merged update is non-zero on {pct(share)} of its {len(tensors)} tensors' coordinates"]
    shares = list((record.get("nonzero_fraction") or {}).values())
    if not shares:
        return []
    return [f"- the merged update is non-zero on {pct(min(shares))} to {pct(max(shares))} of each tensor"]


def _certificate(descent: Mapping[str, Any]) -> str:
    inner = float(descent.get("total_inner", 0.0))
    if descent.get("alpha") == 0:
        return "- first-order descent certificate: none needed, nothing is added (`⟨ḡ, Δ⟩ = 0`)"
    sign = "≤ 0: to first order the update lowers" if inner <= 0 else "> 0: to first order the update raises"
    return (
        f"- first-order descent certificate: `⟨ḡ, Δ⟩ = {inner:.4e}` {sign} B's loss on the voting "
        "examples (`ḡ`: B's mean loss gradient on them; `Δ`: the update added to B, α included)"
    )


def _tensor_table(record: Mapping[str, Any]) -> str:
    """Per tensor: the kept share and ``⟨ḡ, Δ⟩`` (or, without votes, the kept or non-zero share)."""
    tensors = (record.get("descent") or {}).get("tensors", [])
    if tensors:
        header = ["tensor", "kept", "⟨ḡ, Δ⟩"]
        rows = [
            [f"`{t['name']}`", pct(t.get("kept_fraction")), f"{t.get('inner', 0.0):.3e}"] for t in tensors
        ]
    else:
        header = ["tensor", "kept" if "kept_fraction" in record else "non-zero"]
        shares = record.get("kept_fraction") or record.get("nonzero_fraction") or {}
        rows = [[f"`{name}`", pct(share)] for name, share in shares.items()]
    if not rows:
        return ""
    table = [header, ["---"] * len(header), *rows]
    body = "\n".join("| " + " | ".join(row) + " |" for row in table)
    return f"<details>\n<summary>Per tensor ({len(rows)})</summary>\n\n{body}\n\n</details>"


def _score(value: Any, chosen: bool) -> str:
    text = num(value) if value is not None else "n/a"
    return f"**{text}**" if chosen else text
