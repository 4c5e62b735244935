"""The candidates of the automatic choice: the grids of α and gate thresholds, and the record of
a choice.

A candidate is a gate threshold ``t`` and a scale ``α``: ``θ_B + α · (m_t ⊙ τ_A)``. The α grid
grows past its largest value only for a threshold where that value wins (:func:`top_wins`,
:func:`larger_steps`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gradfix.errors import ConfigError

NAIVE = 2.0
"""A gate threshold above 1: no coordinate is ever dropped (naive addition ``θ_B + α τ_A``)."""

DEFAULT_ALPHAS: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 1.5, 2.0)
"""α grid: 0 keeps the target unchanged; 0.02 … 0.2 are small steps (a ratio of 2 to 2.5 between
neighbours: where B and A share no coordinates the useful α is a small step along B's own
descent signs), 0.5 … 2 the full-size transports (α = 1 is τ_A as fine-tuned, up to 2 as in the
paper's sweep). Every candidate costs one forward pass over the held-out shots per fold."""
GROWN_ALPHAS: tuple[float, ...] = (3.0, 4.0, 5.0, 6.0, 8.0)
"""Larger steps, tried where the default grid's largest α wins: far from A the useful step can be
several times τ_A (the far MiniLM release's naive addition peaks at α = 5 on validation, 43 % test
accuracy against 31 % at α = 2). Scored after the grid, so ties keep the smaller α."""
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.0, 0.2, 0.4, NAIVE)


@dataclass(frozen=True)
class Choice:
    """The chosen ``(threshold, α)``, its score, and every candidate's score (for the record)."""

    threshold: float
    alpha: float
    score: float
    scores: dict[str, float] = field(default_factory=dict)
    source: str = "validation"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record."""
        return {
            "threshold": self.threshold,
            "alpha": self.alpha,
            "score": self.score,
            "source": self.source,
            "scores": dict(self.scores),
        }


def top_wins(alpha: float, alphas: Sequence[float]) -> bool:
    """Whether ``alpha`` is the grid's largest (and moves B): the grid should grow past it."""
    return alpha > 0 and alpha == max(alphas)


def larger_steps(alphas: Sequence[float], grown: Sequence[float] | None) -> list[float]:
    """The steps of ``grown`` above the grid (``None``: :data:`GROWN_ALPHAS` for the default grid,
    none for a grid the caller chose)."""
    if grown is None:
        grown = GROWN_ALPHAS if tuple(alphas) == DEFAULT_ALPHAS else ()
    return [a for a in grown if a > max(alphas)]


def best_candidate(
    score: Callable[[float, float], float],
    thresholds: Sequence[float],
    alphas: Sequence[float],
    grown: Sequence[float] | None = None,
) -> tuple[float, float]:
    """The candidate ``(t, α)`` of the highest ``score(t, α)`` (the earlier on a tie).

    Every threshold is scored on the grid first (threshold by threshold); a threshold is then
    scored at the larger steps (:func:`larger_steps`) when its own best α is the grid's largest,
    or the best of every threshold is: naive addition may peak past the grid while a mask peaks
    inside it. ``score`` is called once per candidate, threshold by threshold in each pass.
    """
    seen: dict[tuple[float, float], float] = {}

    def best_of(keys: list[tuple[float, float]]) -> tuple[float, float]:
        for key in keys:
            if key not in seen:
                seen[key] = score(*key)
        return max(keys, key=lambda k: (seen[k], -keys.index(k)))

    own = {t: best_of([(t, a) for a in alphas]) for t in thresholds}
    overall = best_of(list(own.values()))
    larger = larger_steps(alphas, grown)
    keys: list[tuple[float, float]] = []
    for t in thresholds:
        grows = top_wins(overall[1], alphas) or top_wins(own[t][1], alphas)
        keys += [(t, a) for a in [*alphas, *(larger if grows else [])]]
    return best_of(keys)


def candidate_key(threshold: float, alpha: float) -> str:
    """The record key of one candidate, e.g. ``"t=0.2,a=1"`` (``t=naive`` above 1)."""
    t = "naive" if threshold > 1 else f"{threshold:g}"
    return f"t={t},a={alpha:g}"


def check_grid(thresholds: Iterable[float], alphas: Iterable[float]) -> None:
    """A one-line :class:`ConfigError` for an empty grid or a value that is not a finite number."""
    thresholds, alphas = list(thresholds), list(alphas)
    if not thresholds or not alphas:
        raise ConfigError("the candidate grid needs at least one threshold and one α")
    bad = [t for t in thresholds if not math.isfinite(t) or t < 0]
    if bad:
        raise ConfigError(f"gate thresholds must be finite and ≥ 0, got {bad}")
    bad = [a for a in alphas if not math.isfinite(a)]
    if bad:
        raise ConfigError(f"α values must be finite, got {bad}")
