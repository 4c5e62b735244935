"""The rules that pick a candidate ``(t, α)`` from its held-out losses on folds of the shots.

Every rule reads the same evidence, gathered by :func:`gradfix.methods.autotune.score_on_shots`:
for each held-out shot ``i`` (``n`` of them, each in one fold ``f(i)``) the loss ``ℓ_i(c)`` of
every candidate ``c`` and the loss ``ℓ_i(B)`` of the target itself, plus the candidates a guard
allows (e.g. none less accurate than B on the held-out shots). The functions are pure: tensors
in, a candidate (or ``None``: keep B) out.

- :func:`lowest` (``min``): the lowest mean held-out loss ``L(c) = mean_i ℓ_i(c)``;
- :func:`one_standard_error` (``one-se``): the smallest update whose ``L`` is within one standard
  error of the lowest;
- :func:`no_harm` (``no-harm``, the default): keep B unless a candidate's improvement over B is
  positive on every fold and larger than ``margin`` standard errors of its mean (the equation is
  in its docstring).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Candidate = tuple[float, float]
"""A gate threshold ``t`` and a scale ``α``."""

RULES = ("no-harm", "one-se", "min")
DEFAULT_RULE = "no-harm"
DEFAULT_MARGIN = 1.0
"""Standard errors by which the no-harm rule's mean improvement over B must exceed zero."""


@dataclass(frozen=True)
class Improvement:
    """How much a candidate lowers the held-out loss below B's: mean, its standard error, worst fold."""

    mean: float
    se: float
    worst_fold: float

    def bound(self, margin: float) -> float:
        """The lower confidence bound ``mean − margin · se``."""
        return self.mean - margin * self.se


def improvement(losses: Tensor, base: Tensor, folds: Tensor) -> Improvement:
    """``d_i = ℓ_i(B) − ℓ_i(c)``: its mean, ``sd(d) / √n`` and the lowest per-fold mean.

    Non-finite losses give a mean of ``−inf`` (never an improvement).
    """
    d = (base - losses).double()
    if not bool(torch.isfinite(d).all()):
        return Improvement(-math.inf, math.inf, -math.inf)
    n = d.numel()
    se = float(d.std()) / math.sqrt(n) if n > 1 else math.inf
    worst = min(float(d[folds == f].mean()) for f in torch.unique(folds).tolist())
    return Improvement(float(d.mean()), se, worst)


def _mean(losses: Tensor) -> float:
    return float(losses.mean()) if bool(torch.isfinite(losses).all()) else math.inf


def lowest(losses: Mapping[Candidate, Tensor], allowed: Sequence[Candidate]) -> Candidate:
    """The allowed candidate with the lowest mean loss (the earlier on a tie)."""
    return min(allowed, key=lambda key: _mean(losses[key]))


def one_standard_error(
    losses: Mapping[Candidate, Tensor], allowed: Sequence[Candidate], size: Callable[[Candidate], float]
) -> Candidate:
    """The smallest ``size`` among the allowed candidates within one standard error of the lowest.

    With ``c*`` the lowest: ``L(c) − L(c*) ≤ sd_i(ℓ_i(c) − ℓ_i(c*)) / √n``.
    """
    best = lowest(losses, allowed)
    if not math.isfinite(_mean(losses[best])):
        return best
    n = losses[best].numel()

    def within(key: Candidate) -> bool:
        if not math.isfinite(_mean(losses[key])):
            return False
        spread = float((losses[key] - losses[best]).std()) if n > 1 else 0.0
        return _mean(losses[key]) - _mean(losses[best]) <= spread / math.sqrt(n)

    return min((key for key in allowed if within(key)), key=size)


def no_harm(
    losses: Mapping[Candidate, Tensor],
    base: Tensor,
    folds: Tensor,
    allowed: Sequence[Candidate],
    margin: float = DEFAULT_MARGIN,
) -> Candidate | None:
    """The candidate with the best sure improvement over B, or ``None`` (keep B) when none is sure.

    With ``d_i(c) = ℓ_i(B) − ℓ_i(c)`` the held-out improvement on shot ``i``, ``d̄(c)`` its mean
    over the ``n`` held-out shots, ``SE(c) = sd_i(d_i(c)) / √n`` and ``D_f(c)`` its mean over
    fold ``f``, a candidate qualifies when

        ``min_f D_f(c) > 0``  and  ``d̄(c) − z · SE(c) > 0``   (``z = margin``),

    i.e. it lowers the loss on every fold and by more than ``z`` standard errors overall; among
    those (and only the ``allowed`` ones) the largest lower bound ``d̄(c) − z · SE(c)`` wins (the
    earlier on a tie). A candidate with ``α = 0`` is B itself (``d ≡ 0``) and never qualifies, so
    ``None`` means "return B unchanged".
    """
    bounds = {}
    for key in allowed:
        gain = improvement(losses[key], base, folds)
        if gain.worst_fold > 0 and gain.bound(margin) > 0:
            bounds[key] = gain.bound(margin)
    return _highest(bounds) if bounds else None


def best_bound(
    losses: Mapping[Candidate, Tensor],
    base: Tensor,
    folds: Tensor,
    allowed: Sequence[Candidate],
    margin: float = DEFAULT_MARGIN,
) -> Candidate:
    """The allowed candidate with the largest ``d̄(c) − z · SE(c)`` (the earlier on a tie)."""
    return _highest({key: improvement(losses[key], base, folds).bound(margin) for key in allowed})


def _highest(bounds: Mapping[Candidate, float]) -> Candidate:
    """The key of the largest bound, the earlier (in the mapping's order) on a tie."""
    order = list(bounds)
    return max(order, key=lambda key: (bounds[key], -order.index(key)))


__all__ = [
    "DEFAULT_MARGIN",
    "DEFAULT_RULE",
    "RULES",
    "Candidate",
    "Improvement",
    "best_bound",
    "improvement",
    "lowest",
    "no_harm",
    "one_standard_error",
]
