"""The pre-flight check of a transport: how far B drifted from A and whether ``τ_A`` can help B.

:func:`check_transport` reads the same inputs as :func:`gradfix.jobs.transport_checkpoints` and
writes nothing. It measures

- the drift ``‖θ_B − θ_A‖ / ‖θ_A‖`` per tensor and in total (read in row slices);
- the sign agreement of ``τ_A`` with B's vote on the shots (:mod:`gradfix.jobs.check_stats`):
  its estimate, an interval from bootstrap resamples of the shots, and the band of chance
  agreement from ``τ_A`` with its rows and columns permuted within tensors;
- the first-order loss change ``⟨ḡ, α·Δ⟩`` of naive addition (``Δ = τ_A``) and of the GradFix
  agreement mask (``Δ = m ⊙ τ_A``) at α = 1 (:func:`gradfix.diagnostics.descent_report`);
- when ``τ_A`` is not clearly 2 points above chance, the same agreement after aligning ``τ_A`` by re-basin
  (TransFusion's weight matching), where the model's layout allows it (read from the checkpoint
  headers first, so a model that cannot be permuted loads no weights for it);

and states a verdict with a recommended method (:func:`gradfix.jobs.check_verdict.decide`).

Cost: B votes one shot at a time (one forward and one backward pass per shot), so each shot's
gradient on a seeded sample of coordinates is kept and a bootstrap resample's vote is a
re-weighted sum of them, not another vote. The whole costs about one vote with the ``loop``
engine (1–3 × one batched vote), plus ``permutations`` passes over ``τ_A`` for the null (one
tensor at a time), plus re-basin when it is tried (both bases in memory, as TransFusion).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from gradfix.diagnostics import DescentReport
from gradfix.errors import ConfigError, DataError
from gradfix.io import CheckpointReader, open_checkpoint
from gradfix.io.checkpoint import row_slices
from gradfix.jobs.check_stats import (
    AgreementTally,
    DriftTally,
    agreement_counts,
    bootstrap_agreements,
    estimate_sign,
    resample_weights,
    sample_coordinates,
    spread,
    unit_shuffle,
)
from gradfix.jobs.check_verdict import Agreement, CheckStatistics, decide
from gradfix.jobs.check_votes import align_by_rebasin
from gradfix.jobs.common import (
    Shots,
    base_record,
    draw_shots,
    load_target,
    open_task_vector,
    rename_votes,
    voting_placement,
)
from gradfix.jobs.inputs import check_checkpoints, input_record
from gradfix.ops.signs import count_dtype
from gradfix.recipes.base import place_batch
from gradfix.settings import CheckSettings, VoteSettings
from gradfix.task_vector import TaskVector, float_names
from gradfix.votes import SignVotes, estimate_signs


@dataclass
class _ShotVotes:
    """B's votes on the shots, and each shot's gradient on the sampled coordinates."""

    votes: SignVotes
    coordinates: dict[str, Tensor]
    touched: list[str]
    """Tensors that received a gradient (the others keep their sampled coordinates, never compared)."""
    grads: Tensor
    """``[shots, sampled coordinates]``: each shot's gradient there."""
    labels: list[str]
    weights: Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    """``[resamples, shots]``: the bootstrap resamples."""
    null: Tensor = field(default_factory=lambda: torch.zeros(0))
    """The agreements of ``τ_A``'s unit shuffles with the vote."""


def check_transport(
    source_base: str | Path,
    source_finetuned: str | Path,
    target_base: str | Path,
    votes: VoteSettings,
    settings: CheckSettings | None = None,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> dict[str, Any]:
    """Measure whether ``τ_A = source_finetuned − source_base`` can help ``target_base``; write nothing.

    ``source_finetuned`` is a checkpoint or a PEFT LoRA adapter folder, as for a transport;
    ``votes`` says how B votes (recipe, ``votes.data``, shots, seed, estimator, engine);
    ``settings`` the bootstrap, the null and re-basin; ``include``/``exclude`` select tensors. The
    inputs are checked as a transport checks them (one-line errors). Returns a JSON-ready record
    with ``drift`` (total) and ``drift_tensors``, ``sign_agreement`` (``estimate``, ``low``,
    ``high``, ``se``, ``z``, ``null``, ``bootstrap``, ``tensors``), ``first_order``, ``rebasin``,
    ``unvoted``, and the verdict (:func:`gradfix.jobs.check_verdict.decide`): ``verdict``,
    ``recommended_method`` and ``reason``.
    """
    settings = settings or CheckSettings()
    for key in ("bootstrap", "permutations", "coordinates"):
        if getattr(settings, key) < 2:
            raise ConfigError(f"--{key} must be at least 2 to measure a spread, got {getattr(settings, key)}")
    drawn = draw_shots(target_base, votes)
    record = base_record("check")
    generator = torch.Generator().manual_seed(votes.seed)
    with ExitStack() as stack:
        rb = stack.enter_context(open_checkpoint(source_base))
        rt = stack.enter_context(open_checkpoint(target_base))
        paths = (source_base, source_finetuned, target_base)
        tau, names, nonzero = open_task_vector(stack, paths, rb, rt, include, exclude)
        record["inputs"] = {
            "source_base": input_record(source_base),
            "source_finetuned": input_record(source_finetuned),
            "target_base": input_record(target_base),
        }
        drift = _drift(rb, rt, source_base, target_base, include, exclude)
        record.update(drift=drift.total(), drift_tensors=drift.tensors())
        voted = [n for n in names if n in nonzero]
        shots = _vote_per_sample(rt, votes, voted, drawn, settings.coordinates, generator)
        record["data"] = {
            **input_record(drawn.data),
            "labels": drawn.labels,
            "num_examples": len(drawn.examples),
            "num_samples": shots.votes.num_samples,
            "drawn_lines": [ex.line for ex in drawn.drawn],
            **voting_placement(target_base, votes).record(),
        }
        record["unvoted"] = [n for n in voted if n not in shots.touched]
        shapes = rt.shapes()
        stats = _direct(record, lambda n: tau.whole(n, shapes[n]), shots, settings, generator)
        stats = _after_rebasin(
            record, stats, lambda n: tau.whole(n, shapes[n]), shots, settings, paths, votes.seed
        )
    record.update(decide(stats).to_dict())
    return record


def _direct(
    record: dict[str, Any],
    get: Callable[[str], Tensor],
    shots: _ShotVotes,
    settings: CheckSettings,
    generator: torch.Generator,
) -> CheckStatistics:
    """Measure ``τ_A`` (``get(name)``: a whole tensor) against the vote: agreement, null, bootstrap
    and first-order loss changes, into ``record``."""
    weights, stratified = resample_weights(shots.labels, settings.bootstrap, generator)
    shots.weights = weights
    direct, shots.null = _measure(get, shots, settings.permutations, generator)
    stats = _agreement(direct, shots)
    record["sign_agreement"] = _agreement_record(direct, stats)
    record["sign_agreement"]["null"] = {
        "mean": stats.chance,
        "low": stats.band[0],
        "high": stats.band[1],
        "sd": stats.chance_sd,
        "permutations": settings.permutations,
    }
    record["sign_agreement"]["bootstrap"] = {
        "resamples": settings.bootstrap,
        "coordinates": int(shots.grads.shape[1]),
        "stratified": stratified,
    }
    record["first_order"] = _first_order(direct)
    return CheckStatistics(stats, DescentReport(direct.naive, 1.0).total_inner)


def _after_rebasin(
    record: dict[str, Any],
    stats: CheckStatistics,
    get: Callable[[str], Tensor],
    shots: _ShotVotes,
    settings: CheckSettings,
    paths: tuple[str | Path, str | Path, str | Path],
    seed: int,
) -> CheckStatistics:
    """``stats`` with the agreement of ``τ_A`` aligned by re-basin, when it is tried and applies."""
    if settings.rebasin == "never" or (settings.rebasin == "auto" and stats.direct.strong):
        why = (
            "--rebasin never"
            if settings.rebasin == "never"
            else "τ_A agrees clearly, by 2 points or more above chance"
        )
        record["rebasin"] = {"tried": False, "reason": why}
        return stats
    whole = TaskVector({n: get(n) for n in shots.touched})
    aligned, reason = align_by_rebasin(whole, paths[0], paths[2], seed)
    if aligned is None:
        record["rebasin"] = {"tried": False, "reason": reason}
        return stats
    why = (
        "--rebasin always"
        if settings.rebasin == "always"
        else "τ_A does not agree clearly by 2 points or more above chance"
    )
    measured, _ = _measure(aligned.__getitem__, shots, 0, torch.Generator())
    aligned_stats = _agreement(measured, shots)
    stats = replace(stats, aligned=aligned_stats)
    record["rebasin"] = {
        "tried": True,
        "reason": why,
        "sign_agreement": _agreement_record(measured, aligned_stats),
        "gain": stats.gain,
        "first_order": _first_order(measured),
    }
    return stats


def _drift(
    rb: CheckpointReader,
    rt: CheckpointReader,
    source_base: str | Path,
    target_base: str | Path,
    include: Sequence[str],
    exclude: Sequence[str],
) -> DriftTally:
    """``‖θ_B − θ_A‖ / ‖θ_A‖`` over the selected floating-point tensors of both bases, in row slices."""
    names = float_names(rb.dtypes(), rt.dtypes(), include=include, exclude=exclude)
    labelled = {f"source base {source_base}": rb, f"target base {target_base}": rt}
    check_checkpoints(labelled, names, source_base)
    tally = DriftTally()
    shapes = rb.shapes()
    for name in names:
        for start, stop in row_slices(shapes[name]):
            tally.add(name, rb.rows(name, start, stop), rt.rows(name, start, stop))
    return tally


def _vote_per_sample(
    target: CheckpointReader,
    votes: VoteSettings,
    voted: Sequence[str],
    drawn: Shots,
    budget: int,
    generator: torch.Generator,
) -> _ShotVotes:
    """B's votes on the shots, one shot at a time, keeping each shot's gradient on sampled coordinates.

    A shot's per-sample gradient is one ordinary backward pass (the ``loop`` engine on a batch of
    one; ``votes.engine`` and ``votes.batch_size`` do not apply), and the summed counts equal a
    batched vote's (integer sums). A vote that gave no selected tensor any gradient is a
    :class:`DataError`.
    """
    model, recipe, mapping = load_target(target.path, votes, drawn.labels, target.names(), voted)
    trainable = {
        mapping[n]: p.numel() for n, p in model.named_parameters() if p.requires_grad and n in mapping
    }
    coordinates = sample_coordinates({n: trainable[n] for n in voted if n in trainable}, budget, generator)
    counts: dict[str, Tensor] = {}
    grad_sum: dict[str, Tensor] = {}
    hits: Counter[str] = Counter()
    rows: list[Tensor] = []
    for example in tqdm(drawn.drawn, unit="shot", desc="votes", disable=not votes.progress, leave=False):
        batch = place_batch(recipe.collate([example]), model)
        one = estimate_signs(model, [batch], recipe.loss, "majority", engine="loop", progress=False)
        one = rename_votes(one, mapping)
        rows.append(_gather(one.grad_sum, coordinates))
        for name, g in one.grad_sum.items():  # added in place: no model-sized copy per shot
            counts.setdefault(name, torch.zeros(g.shape, dtype=torch.int32)).add_(one.counts[name])
            grad_sum.setdefault(name, torch.zeros_like(g)).add_(g)
        hits.update(one.hits)
    n = len(rows)
    total = SignVotes(
        {k: c.to(count_dtype(n)) for k, c in counts.items()}, grad_sum, n, "majority", dict(hits)
    )
    touched = [name for name in coordinates if total.hits.get(name, 0) > 0]
    if not touched:
        raise DataError(
            f"{drawn.data}: the target gave no gradient to any selected tensor on the shots (one "
            "class, or only frozen tensors selected); give data with at least two labels, or check "
            "--include/--exclude"
        )
    labels = [ex.label for ex in drawn.drawn]
    return _ShotVotes(total.with_estimator(votes.estimator), coordinates, touched, torch.stack(rows), labels)


def _gather(grads: dict[str, Tensor], coordinates: dict[str, Tensor]) -> Tensor:
    """One shot's gradient on the sampled coordinates, tensors in order."""
    parts = [grads[n].reshape(-1)[idx].float() for n, idx in coordinates.items()]
    return torch.cat(parts) if parts else torch.zeros(0)


def _measure(
    get: Callable[[str], Tensor], shots: _ShotVotes, permutations: int, generator: torch.Generator
) -> tuple[AgreementTally, Tensor]:
    """A task vector's agreement with the vote, tensor by tensor (``get(name)``: the whole tensor),
    and the agreements of ``permutations`` unit shuffles of it (the null)."""
    votes, measure = shots.votes, AgreementTally()
    agreeing = torch.zeros(permutations, dtype=torch.float64)
    compared = torch.zeros(permutations, dtype=torch.float64)
    touched = set(shots.touched)
    for name, picked in shots.coordinates.items():
        if name not in touched:  # no gradient: its sampled coordinates never compare
            measure.sampled.append(torch.zeros(len(picked), dtype=torch.int8))
            continue
        tau = get(name)
        sign = estimate_sign(votes.counts.get(name), votes.grad_sum[name], votes.estimator)
        measure.add(name, tau, sign, votes.grad_sum[name] / votes.num_samples, picked)
        tau_sign = torch.sign(tau).to(torch.int8)  # shuffling the signs is shuffling τ, 4 × cheaper
        for p in range(permutations):
            a, c = agreement_counts(unit_shuffle(tau_sign, generator), sign)
            agreeing[p] += a
            compared[p] += c
    return measure, agreeing / compared.clamp(min=1)


def _agreement(measure: AgreementTally, shots: _ShotVotes) -> Agreement:
    """The agreement of ``measure`` with its bootstrap spread and the null's mean and spread."""
    sampled = torch.cat(measure.sampled) if measure.sampled else torch.zeros(0, dtype=torch.int8)
    boot = bootstrap_agreements(shots.grads, [sampled], shots.weights, shots.votes.estimator)[0]
    _, se = spread(boot)
    chance, chance_sd = spread(shots.null)
    return Agreement(measure.estimate, se, chance, chance_sd)


def _agreement_record(measure: AgreementTally, stats: Agreement) -> dict[str, Any]:
    """The record of one agreement: estimate, interval from the shots' spread, z against chance."""
    return {
        "estimate": stats.estimate,
        "low": stats.low,
        "high": stats.high,
        "se": stats.se,
        "excess": stats.excess,
        "z": stats.z,
        "compared": measure.compared,
        "tensors": measure.tensors,
    }


def _first_order(measure: AgreementTally) -> dict[str, Any]:
    """``⟨ḡ, Δ⟩`` at α = 1 of naive addition and of the agreement-masked update, per tensor and in total."""
    naive, masked = DescentReport(measure.naive, 1.0), DescentReport(measure.masked, 1.0)
    return {
        "alpha": 1.0,
        "naive": naive.total_inner,
        "masked": masked.total_inner,
        "masked_kept_fraction": masked.kept_fraction,
        "tensors": {
            n.name: {"naive": n.inner, "masked": m.inner}
            for n, m in zip(measure.naive, measure.masked, strict=True)
        },
    }
