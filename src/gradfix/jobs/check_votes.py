"""The check's verdict from votes a job already holds (a transport's): no second vote.

:func:`verdict_from_votes` measures what :mod:`gradfix.jobs.check` measures, from the target's
summed votes (a :class:`~gradfix.masking.VoteReference`) instead of a vote of its own:

- the sign agreement of ``τ_A`` with the votes, over every compared coordinate;
- the chance band: the agreements of ``permutations`` unit shuffles of ``τ_A`` (rows and columns
  permuted within tensors, :func:`~gradfix.jobs.check_stats.unit_shuffle_at`) on a seeded sample
  of at most ``coordinates`` coordinates, so the null costs the sample, not the model;
- ``⟨ḡ, τ_A⟩``, the first-order loss change of naive addition at α = 1;
- when ``τ_A`` is not clearly 2 points above chance and the layout allows re-basin (read from the checkpoints'
  names and shapes, no weight loaded: :func:`rebasin_blocker`), the agreement of ``τ_A`` aligned
  to B by TransFusion's weight matching;

and states the verdict with :func:`gradfix.jobs.check_verdict.decide`. Summed votes keep no
per-shot gradient, so there is no bootstrap over the shots: the verdict rests on the permutation
null alone (the record's ``statistic`` says so). ``gradfix check`` also asks that another draw of
shots keep the agreement above chance, so it can call ``weak`` what this calls ``transfers``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradfix.errors import ConfigError, MismatchError
from gradfix.io import CheckpointReader, open_checkpoint
from gradfix.jobs.check_stats import agreement_counts, sample_coordinates, share, spread, unit_shuffle_at
from gradfix.jobs.check_verdict import Agreement, CheckStatistics, decide
from gradfix.masking import TauRows, VoteReference
from gradfix.methods import get_method
from gradfix.methods.aligned import num_heads_of
from gradfix.methods.permutation_spec import present_spec, spec_for_state_dict
from gradfix.ops.reductions import ordered_dot
from gradfix.task_vector import TaskVector
from gradfix.votes import SignVotes

NULL_COORDINATES = 200_000
"""Coordinates of ``τ_A`` on which the null (its unit shuffles) is measured."""
NULL_PERMUTATIONS = 20
"""Unit shuffles of ``τ_A`` that make the null."""
STATISTIC = (
    "permutation null: τ_A's rows and columns permuted within tensors, on sampled coordinates; "
    "no bootstrap over the shots (the summed votes keep no per-shot gradient)"
)
NOTHING_NOTE = (
    "nothing of A's fine-tune transfers to B: whatever gain this transport shows is B's own "
    "gradient step on the shots, not A's knowledge; fine-tune B instead"
)


@dataclass
class VotesCheck:
    """The verdict's record (``gradfix.json``'s ``check``) and, when re-basin was measured, ``τ_A``
    aligned to B (every tensor given, zero ones included)."""

    record: dict[str, Any]
    aligned: TaskVector | None = None

    @property
    def verdict(self) -> str | None:
        """The verdict code (``None`` when nothing could be compared)."""
        return self.record.get("verdict")


def rebasin_blocker(source_base: str | Path, target_base: str | Path) -> str:
    """Why re-basin cannot align these bases, from names and shapes alone ('' when it can).

    TransFusion detects the layout (a BERT-like encoder or a chain of linear layers) from the
    source base's tensors and needs the target's to have the same shapes; both are read here from
    the checkpoint headers (meta tensors), so a model that cannot be permuted costs no weight load.
    """
    try:
        with open_checkpoint(source_base) as ra, open_checkpoint(target_base) as rb:
            a, b = _meta(ra.shapes(), ra.dtypes()), _meta(rb.shapes(), rb.dtypes())
        present_spec(spec_for_state_dict(a, num_heads=num_heads_of(source_base)), a, b)
    except (ConfigError, MismatchError) as exc:
        return f"re-basin does not apply to this model: {exc}"
    return ""


def align_by_rebasin(
    tau: TaskVector, source_base: str | Path, target_base: str | Path, seed: int
) -> tuple[TaskVector | None, str]:
    """``τ_A`` aligned to B by TransFusion's weight matching, or ``None`` and why it does not apply
    (checked from the headers first, :func:`rebasin_blocker`; the reason is empty when it applies)."""
    why = rebasin_blocker(source_base, target_base)
    if why:
        return None, why
    try:
        aligned = get_method("transfusion").align(tau, source_base, target_base, seed=seed)
    except (ConfigError, MismatchError) as exc:
        return None, f"re-basin does not apply to this model: {exc}"
    return aligned, ""


def _meta(shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, torch.dtype]) -> dict[str, Tensor]:
    return {n: torch.empty(shapes[n], dtype=dtypes[n], device="meta") for n in shapes}


@dataclass
class _Null:
    """The unit shuffles of ``τ`` on sampled coordinates, and their agreements as they add up."""

    picked: dict[str, Tensor]
    permutations: int
    generator: torch.Generator
    agreeing: Tensor = field(init=False)
    compared: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.agreeing = torch.zeros(self.permutations, dtype=torch.float64)
        self.compared = torch.zeros(self.permutations, dtype=torch.float64)

    def add(self, name: str, tau: Tensor, sign: Tensor) -> None:
        """Add tensor ``name``: ``permutations`` shuffles of ``τ``'s signs against the vote ``ŝ``."""
        picked = self.picked[name]
        tau_sign, vote = torch.sign(tau).to(torch.int8), sign.reshape(-1)[picked]
        for p in range(self.permutations):
            agreeing, compared = agreement_counts(unit_shuffle_at(tau_sign, picked, self.generator), vote)
            self.agreeing[p] += agreeing
            self.compared[p] += compared

    def agreements(self) -> Tensor:
        """The agreement of every shuffle."""
        return self.agreeing / self.compared.clamp(min=1)


@dataclass
class _Tally:
    agreeing: int = 0
    compared: int = 0
    inner: float = 0.0


def _measure(
    tau: TauRows,
    names: Sequence[str],
    shapes: Mapping[str, tuple[int, ...]],
    votes: VoteReference,
    null: _Null | None = None,
) -> _Tally:
    """Agreement of ``τ`` with the votes and ``⟨ḡ, τ⟩`` over tensors ``names``, one tensor at a
    time, and on the way the ``null``'s shuffles of ``τ`` (one pass over ``τ`` and the votes)."""
    tally = _Tally()
    for name in names:
        t = tau.whole(name, shapes[name])
        reference, gradient = votes.rows(name, 0, _rows(shapes[name]))
        agreeing, compared = agreement_counts(t, reference.sign)
        tally.agreeing, tally.compared = tally.agreeing + agreeing, tally.compared + compared
        if gradient is not None:
            tally.inner += ordered_dot(gradient.double(), t.double())
        if null is not None:
            null.add(name, t, reference.sign)
    return tally


def _rows(shape: Sequence[int]) -> int:
    return shape[0] if len(shape) else 1


def verdict_from_votes(
    tau: TauRows,
    names: Sequence[str],
    shapes: Mapping[str, tuple[int, ...]],
    votes: VoteReference,
    seed: int,
    rebasin: tuple[str | Path, str | Path] | None = None,
    *,
    nonzero: Collection[str] | None = None,
    coordinates: int = NULL_COORDINATES,
    permutations: int = NULL_PERMUTATIONS,
) -> VotesCheck:
    """The verdict of ``τ_A`` (``tau``, tensors ``names``) against the target's summed ``votes``.

    Only tensors the votes cover (and, when given, in ``nonzero``) are compared; re-basin aligns
    every tensor of ``names``. ``rebasin`` is ``(source base, target base)`` to
    try re-basin when ``τ_A`` is not clearly 2 points above chance (``None``: never). Deterministic for a
    ``seed``. Returns the record (``verdict``, ``recommended_method``, ``reason``, ``statistic``,
    ``sign_agreement`` with its ``null``, ``first_order``, ``rebasin``, and ``note`` when nothing
    transfers) and the aligned ``τ_A`` when re-basin was measured.
    """
    compared = [n for n in names if votes.covers(n) and (nonzero is None or n in nonzero)]
    generator = torch.Generator().manual_seed(seed)
    numels = {n: int(torch.Size(shapes[n]).numel()) for n in compared}
    null = _Null(sample_coordinates(numels, coordinates, generator), permutations, generator)
    direct = _measure(tau, compared, shapes, votes, null)
    if not direct.compared:
        return VotesCheck({"verdict": None, "reason": "no coordinate of τ_A was voted on"})
    chance, chance_sd = spread(null.agreements())
    agreement = Agreement(share(direct.agreeing, direct.compared), 0.0, chance, chance_sd)
    stats = CheckStatistics(agreement, direct.inner)
    record: dict[str, Any] = {
        "statistic": STATISTIC,
        "sign_agreement": _agreement_record(stats.direct, direct),
        "first_order": {"alpha": 1.0, "naive": direct.inner},
    }
    record["sign_agreement"]["null"] = {
        "mean": _finite(chance),
        "low": _finite(stats.direct.band[0]),
        "high": _finite(stats.direct.band[1]),
        "sd": _finite(chance_sd),
        "permutations": permutations,
        "coordinates": sum(len(p) for p in null.picked.values()),
    }
    aligned = None
    if rebasin is None or stats.direct.strong:
        why = "τ_A agrees clearly, by 2 points or more above chance" if rebasin is not None else "not asked"
        record["rebasin"] = {"tried": False, "reason": why}
    elif blocked := rebasin_blocker(*rebasin):  # from the headers: τ_A is not read whole for nothing
        record["rebasin"] = {"tried": False, "reason": blocked}
    else:
        whole = TaskVector({n: tau.whole(n, shapes[n]) for n in names})
        aligned, stats, record["rebasin"] = _after_rebasin(
            whole, compared, shapes, votes, stats, rebasin, seed
        )
    verdict = decide(stats)
    record = {**verdict.to_dict(), **record}
    if verdict.verdict == "nothing-transfers":
        record["note"] = NOTHING_NOTE
    return VotesCheck(record, aligned)


def state_verdict(
    record: dict[str, Any],
    method: str,
    readers: tuple[TauRows, CheckpointReader],
    tensors: tuple[Sequence[str], Collection[str]],
    votes: VoteReference,
    bases: tuple[str | Path, str | Path],
    seed: int,
) -> TauRows:
    """A transport's verdict into ``record["check"]``; returns ``τ_A`` aligned by re-basin when the
    ``method`` is ``adaptive`` and a permutation explains the disagreement (recorded as
    ``aligned_by``), else ``τ_A`` as it was. ``tensors``: every selected name and the non-zero ones."""
    tau, target = readers
    names, nonzero = tensors
    found = verdict_from_votes(tau, names, target.shapes(), votes, seed, bases, nonzero=nonzero)
    record["check"] = found.record
    if found.verdict == "permutation" and found.aligned is not None and method == "adaptive":
        record["aligned_by"] = found.record["aligned_by"] = "transfusion"
        return TauRows(tensors=found.aligned)
    return tau


def aligned_verdict(tau: Mapping[str, Tensor], votes: SignVotes, method: str, seed: int) -> dict[str, Any]:
    """The verdict of ``τ_A`` already aligned to B by an aligned ``method`` (no re-basin tried)."""
    reference = VoteReference([votes], estimator=votes.estimator)
    shapes = {n: tuple(t.shape) for n, t in tau.items()}
    found = verdict_from_votes(TauRows(tensors=tau), list(tau), shapes, reference, seed)
    return {**found.record, "tau": f"aligned to B by --method {method}"}


def _after_rebasin(
    whole: TaskVector,
    compared: Sequence[str],
    shapes: Mapping[str, tuple[int, ...]],
    votes: VoteReference,
    stats: CheckStatistics,
    bases: tuple[str | Path, str | Path],
    seed: int,
) -> tuple[TaskVector | None, CheckStatistics, dict[str, Any]]:
    """``τ_A`` aligned by re-basin (or ``None``), ``stats`` with its agreement, and the record's
    ``rebasin``; the aligned agreement shares the direct one's null."""
    aligned, why = align_by_rebasin(whole, bases[0], bases[1], seed)
    if aligned is None:
        return None, stats, {"tried": False, "reason": why}
    moved = _measure(TauRows(tensors=aligned), compared, shapes, votes)
    direct = stats.direct
    after = Agreement(share(moved.agreeing, moved.compared), 0.0, direct.chance, direct.chance_sd)
    stats = CheckStatistics(direct, stats.naive_inner, after)
    record = {
        "tried": True,
        "reason": "τ_A does not agree clearly by 2 points or more above chance",
        "sign_agreement": _agreement_record(after, moved),
        "gain": stats.gain,
    }
    return aligned, stats, record


def _agreement_record(stats: Agreement, tally: _Tally) -> dict[str, Any]:
    return {
        "estimate": _finite(stats.estimate),
        "excess": _finite(stats.excess),
        "z": _finite(stats.z),
        "compared": tally.compared,
    }


def _finite(value: float) -> float | None:
    """``value``, or ``None`` (JSON ``null``) when it is not finite (a null without spread)."""
    return value if math.isfinite(value) else None


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def warning_line(check: Mapping[str, Any] | None) -> str | None:
    """The one-line warning a transport prints for its check (``None`` when the verdict is
    ``transfers`` or there is none)."""
    if not check or check.get("verdict") in (None, "transfers"):
        return None
    agreement = check["sign_agreement"]
    null = agreement["null"]
    said = (
        f"the sign agreement of τ_A with B's votes is {_pct(agreement['estimate'])} "
        f"(chance {_pct(null['low'])}–{_pct(null['high'])})"
    )
    verdict = check["verdict"]
    if verdict == "permutation":
        after = _pct(check["rebasin"]["sign_agreement"]["estimate"])
        if check.get("aligned_by"):
            done = f"τ_A was aligned by re-basin ({check['aligned_by']}) before its mask and α were chosen"
        else:
            done = "use --method transfusion, or the default (adaptive), which aligns τ_A by re-basin"
        return f"{said}, {after} after re-basin: B's units are A's in another order; {done}"
    if verdict == "nothing-transfers":
        return f"{said}: {check['note']}"
    method = check["recommended_method"]
    line = f"{said}: above chance but not clearly; little of A may transfer (recommended: {method})"
    if check.get("signs_from") == "finetune":
        line += "; the mask's signs come from a short fine-tune of B on the shots (--signs votes: B's votes)"
    return line


def card_section(check: Mapping[str, Any] | None) -> str:
    """The model card's section on the check: the verdict, the agreement and what it means."""
    if not check or check.get("verdict") is None:
        return ""
    agreement = check["sign_agreement"]
    null = agreement["null"]
    lines = [
        "## Pre-flight check",
        "",
        f"Verdict: **{check['verdict']}** (recommended: `{check['recommended_method']}`). {check['reason']}.",
        "",
        f"- sign agreement of `τ_A` with B's votes: {_pct(agreement['estimate'])} over "
        f"{agreement['compared']} coordinates; chance {_pct(null['low'])}–{_pct(null['high'])} "
        f"({null['permutations']} permutations of `τ_A` within tensors on {null['coordinates']} coordinates)",
    ]
    rebasin = check.get("rebasin", {})
    if rebasin.get("sign_agreement"):
        lines.append(f"- after re-basin: {_pct(rebasin['sign_agreement']['estimate'])}")
    if check.get("aligned_by"):
        how = f"by re-basin (`{check['aligned_by']}`)"
        lines.append(f"- `τ_A` was aligned to B {how} before its mask and α were chosen")
    if check.get("note"):
        lines.append(f"- **{check['note']}**")
    return "\n".join(lines)
