"""The held-out evidence of every candidate on folds of the shots, and the choice a rule makes
from it (gathered by :func:`gradfix.methods.autotune.score_on_shots`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gradfix.errors import ConfigError
from gradfix.methods.candidates import Choice, candidate_key, top_wins
from gradfix.methods.shot_rules import (
    DEFAULT_MARGIN,
    DEFAULT_RULE,
    RULES,
    Candidate,
    best_bound,
    lowest,
    no_harm,
    one_standard_error,
)


@dataclass
class FoldScores:
    """Held-out per-sample losses (and hits) of every candidate ``(t, α)`` and of B, per fold."""

    losses: dict[Candidate, list[Tensor]] = field(default_factory=dict)
    hits: dict[Candidate, list[Tensor]] = field(default_factory=dict)
    base: list[Tensor] = field(default_factory=list)
    base_hits: list[Tensor] = field(default_factory=list)
    fold: list[Tensor] = field(default_factory=list)
    norms: dict[float, list[float]] = field(default_factory=dict)
    grid: tuple[float, ...] = ()
    """The α grid; the other scored α are the larger steps, chosen only where its largest wins."""

    def allowed(self) -> list[Candidate]:
        """The candidates at least as accurate as B on the held-out shots (all without hits)."""
        if not self.hits:
            return list(self.losses)
        accuracy = {key: float(torch.cat(parts).mean()) for key, parts in self.hits.items()}
        floor = float(torch.cat(self.base_hits).mean())
        allowed = [key for key in self.losses if accuracy[key] >= floor - 1e-12]
        # α = 0 not in the grid and every candidate below B: the least harmful
        return allowed or [max(accuracy, key=lambda k: accuracy[k])]

    def choose(self, rule: str = DEFAULT_RULE, margin: float = DEFAULT_MARGIN) -> Choice:
        """The candidate of ``rule`` (see :func:`choose_on_shots`) as a :class:`Choice`: first
        among the grid's candidates; then again with the larger steps of every threshold whose own
        pick is the grid's largest α (of every threshold when the overall pick is)."""
        if rule not in RULES:
            raise ConfigError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
        per_sample = {key: torch.cat(parts) for key, parts in self.losses.items()}
        allowed = self.allowed()
        grid = self.grid or tuple(a for _, a in self.losses)
        in_grid = [key for key in allowed if key[1] in grid]
        chosen = self._pick(rule, margin, per_sample, in_grid)
        larger = self._larger(rule, margin, per_sample, in_grid, grid, top_wins(chosen[1], grid))
        if larger:
            chosen = self._pick(
                rule, margin, per_sample, [key for key in allowed if key in larger or key in in_grid]
            )
        mean = {key: -_finite_mean(v) for key, v in per_sample.items()}
        scores = {candidate_key(t, a): v for (t, a), v in mean.items()}
        source = f"{len(self.base)}-fold shots, {rule} rule"
        return Choice(chosen[0], chosen[1], mean[chosen], scores, source)

    def _larger(
        self,
        rule: str,
        margin: float,
        per_sample: dict[Candidate, Tensor],
        in_grid: list[Candidate],
        grid: Sequence[float],
        top: bool,
    ) -> set[Candidate]:
        """The scored larger steps of each threshold whose own pick in the ``grid`` is its largest
        α, or of every threshold when the overall pick is (``top``)."""
        larger: set[Candidate] = set()
        for t in dict.fromkeys(key[0] for key in in_grid):
            own = [key for key in in_grid if key[0] == t]
            if top or top_wins(self._pick(rule, margin, per_sample, own)[1], grid):
                larger.update(key for key in self.losses if key[0] == t and key[1] not in grid)
        return larger

    def _pick(
        self, rule: str, margin: float, per_sample: dict[Candidate, Tensor], allowed: list[Candidate]
    ) -> Candidate:
        base, folds = torch.cat(self.base), torch.cat(self.fold)
        chosen: Candidate | None
        if rule == "min":
            chosen = lowest(per_sample, allowed)
        elif rule == "one-se":
            chosen = one_standard_error(per_sample, allowed, self._size)
        else:
            chosen = no_harm(per_sample, base, folds, allowed, margin)
        if chosen is None:  # B unchanged where the grid allows it, else the best lower bound
            kept = [key for key in self.losses if key[1] == 0]
            chosen = kept[0] if kept else best_bound(per_sample, base, folds, allowed, margin)
        return chosen

    def _size(self, key: Candidate) -> float:
        norms = self.norms[key[0]]
        return abs(key[1]) * sum(norms) / len(norms)


def _finite_mean(values: Tensor) -> float:
    return float(values.mean()) if bool(torch.isfinite(values).all()) else math.inf
