"""The statistics of ``gradfix check``: drift, sign agreement, its null and its bootstrap.

Pure tensor functions, no I/O. The sign agreement of a task vector ``τ`` with the target's sign
estimate ``ŝ`` is the share of coordinates where both are non-zero on which they have the same
sign. Its two spreads are built from the data, not from a binomial model (coordinates are far
from independent: a per-sample gradient ``δ xᵀ`` has the sign pattern of an outer product, so
signs come in whole rows and columns):

- **the null** (:func:`unit_shuffle`): ``τ`` with the rows and the columns of every tensor
  permuted (independently, seeded): the same values and the same row and column structure, but
  no longer on the coordinates B's gradient acts on. Its agreements over several permutations
  give the agreement of a task vector that has nothing to do with B, and their spread;
- **the shots' spread** (:func:`bootstrap_agreements`): the agreement over bootstrap resamples
  of the shots, each resample's vote re-weighted from the per-sample gradients kept on a seeded
  sample of coordinates (:func:`sample_coordinates`), so a resample costs a product of small
  matrices rather than another vote.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gradfix.diagnostics import TensorDescent, descent_report
from gradfix.ops.masks.agreement import agreement_mask
from gradfix.ops.reductions import ordered_sum
from gradfix.settings import Estimator


class DriftTally:
    """``‖θ_B − θ_A‖ / ‖θ_A‖`` per tensor and in total, from row slices added in a fixed order."""

    def __init__(self) -> None:
        """No tensor yet."""
        self.moved: dict[str, float] = {}
        self.size: dict[str, float] = {}

    def add(self, name: str, a: Tensor, b: Tensor) -> None:
        """Add rows of ``θ_A`` (``a``) and of ``θ_B`` (``b``) of tensor ``name``."""
        a64, b64 = a.to(torch.float64), b.to(torch.float64)
        self.moved[name] = self.moved.get(name, 0.0) + ordered_sum((b64 - a64).square())
        self.size[name] = self.size.get(name, 0.0) + ordered_sum(a64.square())

    def tensors(self) -> dict[str, float | None]:
        """Each tensor's drift; ``None`` where ``θ_A`` is zero (a zero-initialised bias)."""
        return {n: math.sqrt(self.moved[n] / s) if s > 0 else None for n, s in self.size.items()}

    def total(self) -> float:
        """``sqrt(Σ ‖θ_B − θ_A‖²) / sqrt(Σ ‖θ_A‖²)`` over every tensor added (0 for none)."""
        size = math.fsum(self.size.values())
        return math.sqrt(math.fsum(self.moved.values()) / size) if size > 0 else 0.0


@dataclass
class AgreementTally:
    """One task vector's agreement with a vote, tensor by tensor; its signs on the sampled
    coordinates (for the bootstrap); and ``⟨ḡ, Δ⟩`` of naive addition and of the agreement mask."""

    agreeing: int = 0
    compared: int = 0
    tensors: dict[str, float] = field(default_factory=dict)
    sampled: list[Tensor] = field(default_factory=list)
    naive: list[TensorDescent] = field(default_factory=list)
    masked: list[TensorDescent] = field(default_factory=list)

    def add(self, name: str, tau: Tensor, sign: Tensor, grad: Tensor, picked: Tensor) -> None:
        """Add tensor ``name`` of ``τ`` against its vote ``ŝ`` and mean gradient ``ḡ``."""
        agreeing, compared = agreement_counts(tau, sign)
        self.agreeing, self.compared = self.agreeing + agreeing, self.compared + compared
        self.tensors[name] = share(agreeing, compared)
        self.sampled.append(torch.sign(tau.reshape(-1)[picked]).to(torch.int8))
        masked = agreement_mask(tau, sign) * tau
        self.naive += descent_report({name: grad}, {name: tau}).tensors
        self.masked += descent_report({name: grad}, {name: masked}, {name: tau}).tensors

    @property
    def estimate(self) -> float:
        """The agreement over every compared coordinate."""
        return share(self.agreeing, self.compared)


def estimate_sign(counts: Tensor | None, grad_sum: Tensor, estimator: Estimator) -> Tensor:
    """``ŝ`` as int8: ``sign(counts)`` for the majority vote, ``sign(−grad_sum)`` for the mean."""
    if estimator == "majority" and counts is not None:
        return torch.sign(counts).to(torch.int8)
    return torch.sign(grad_sum.neg()).to(torch.int8)


def agreement_counts(tau: Tensor, sign: Tensor) -> tuple[int, int]:
    """``(agreeing, compared)``: coordinates where ``τ`` and ``ŝ`` are both non-zero, and of those
    the ones with the same sign."""
    product = torch.sign(tau).to(torch.int8) * sign.to(torch.int8)  # +1 agree, −1 disagree, 0 skip
    return int((product > 0).sum()), int((product != 0).sum())


def share(agreeing: float, compared: float) -> float:
    """``agreeing / compared``, ``nan`` when nothing was compared."""
    return agreeing / compared if compared else math.nan


def unit_shuffle(t: Tensor, generator: torch.Generator) -> Tensor:
    """``t`` with its rows (axis 0) and its columns (axis 1) permuted independently at random.

    A vector is shuffled; further axes (a convolution's kernel) are left in place; a scalar is
    returned as it is. This keeps the row and column sign structure that a task vector and a
    gradient share, so the null's spread is that of structured, not independent, coordinates.
    """
    if t.dim() == 0:
        return t
    out = t.index_select(0, torch.randperm(t.shape[0], generator=generator))
    if t.dim() > 1:
        out = out.index_select(1, torch.randperm(t.shape[1], generator=generator))
    return out


def unit_shuffle_at(t: Tensor, picked: Tensor, generator: torch.Generator) -> Tensor:
    """``unit_shuffle(t, generator).reshape(-1)[picked]`` without shuffling the whole tensor.

    Draws the same row and column permutations as :func:`unit_shuffle` (so the same generator
    state gives the same values) and gathers only the flat coordinates ``picked``: a null over a
    sample of coordinates costs the sample, not the tensor.
    """
    flat = t.reshape(-1)
    if t.dim() == 0:
        return flat[picked]
    rows = torch.randperm(t.shape[0], generator=generator)
    per_row = flat.numel() // t.shape[0] if t.shape[0] else 0
    row, rest = picked // max(per_row, 1), picked % max(per_row, 1)
    if t.dim() > 1:
        cols = torch.randperm(t.shape[1], generator=generator)
        per_col = per_row // t.shape[1] if t.shape[1] else 0
        col, inner = rest // max(per_col, 1), rest % max(per_col, 1)
        rest = cols[col] * per_col + inner
    return flat[rows[row] * per_row + rest]


def sample_coordinates(
    numels: Mapping[str, int], budget: int, generator: torch.Generator
) -> dict[str, Tensor]:
    """About ``budget`` flat coordinates, spread over the tensors in proportion to their size.

    Every coordinate when the tensors hold no more than ``budget``; otherwise each tensor gets
    ``⌊budget · numel / total⌋`` coordinates drawn uniformly with replacement (seeded).
    """
    total = sum(numels.values())
    if total <= budget:
        return {n: torch.arange(k) for n, k in numels.items()}
    picked = {}
    for name, k in numels.items():
        count = budget * k // total
        picked[name] = torch.randint(k, (count,), generator=generator)
    return picked


def resample_weights(
    labels: Sequence[str], resamples: int, generator: torch.Generator
) -> tuple[Tensor, bool]:
    """Bootstrap weights ``[resamples, n]``: how often each shot is drawn in each resample.

    Shots are resampled within their class (so every resample keeps the classes' balance) when
    every class has at least two shots; otherwise over all shots. Returns the weights and whether
    they were stratified.
    """
    n = len(labels)
    groups: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(label, []).append(index)
    stratified = all(len(g) >= 2 for g in groups.values())
    pools = list(groups.values()) if stratified else [list(range(n))]
    weights = torch.zeros(resamples, n)
    for pool in pools:
        members = torch.tensor(pool)
        draws = members[torch.randint(len(pool), (resamples, len(pool)), generator=generator)]
        weights.scatter_add_(1, draws, torch.ones(draws.shape))
    return weights, stratified


def bootstrap_agreements(
    grads: Tensor, tau_signs: Sequence[Tensor], weights: Tensor, estimator: Estimator, chunk: int = 16
) -> list[Tensor]:
    """Per task vector, its agreement with the vote of every bootstrap resample, shape ``[B]``.

    ``grads [n, M]`` holds each shot's gradient on the sampled coordinates, ``tau_signs`` one
    ``[M]`` sign tensor per task vector on the same coordinates, ``weights [B, n]`` the resamples.
    A resample's vote is ``sign(w · sign(−g))`` (majority) or ``sign(−w · g)`` (mean); a resample
    that leaves no coordinate to compare gives ``nan``.
    """
    votes = grads.neg().sign() if estimator == "majority" else grads.neg()
    out: list[list[Tensor]] = [[] for _ in tau_signs]
    for start in range(0, weights.shape[0], chunk):
        sign = torch.sign(weights[start : start + chunk] @ votes).to(torch.int8)
        for k, s_tau in enumerate(tau_signs):
            both = (s_tau != 0) & (sign != 0)
            agree, compared = (both & (sign == s_tau)).sum(dim=1).double(), both.sum(dim=1).double()
            out[k].append(torch.where(compared > 0, agree / compared.clamp(min=1), torch.nan))
    return [torch.cat(parts) for parts in out]


def spread(values: Tensor) -> tuple[float, float]:
    """Mean and standard deviation of the finite ``values`` (``nan`` mean for none, 0 deviation
    for fewer than two)."""
    v = values.double()
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return math.nan, 0.0
    return float(v.mean()), float(v.std()) if v.numel() > 1 else 0.0
