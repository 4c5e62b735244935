"""Choosing α and the gate threshold ``t`` without a test set.

Two sources of evidence, as a user has them:

- a **validation file**: :func:`choose_on_validation` scores every candidate ``(t, α)`` by a
  user-given score (validation accuracy) and keeps the best;
- **only the few shots**: :func:`score_on_shots` splits the shots into folds; for each fold it
  votes with the other folds, masks ``τ_A`` with those votes and measures the loss of
  ``θ_B + α · (m_t ⊙ τ_A)`` (and of ``θ_B`` itself) on each held-back shot;
  :func:`choose_on_shots` then applies a rule of :mod:`gradfix.methods.shot_rules`. The default
  rule, ``no-harm``, keeps B unchanged unless a candidate lowers B's held-out loss on every fold
  and by more than one standard error (the final model then votes on every shot).

A candidate's threshold ``t`` is the vote-margin gate's (:func:`gradfix.ops.masks.vote_margin_gate`):
``t = 0`` is GradFix's agreement mask and ``t > 1`` (:data:`NAIVE`) is naive addition.
Ties go to the earlier candidate, so order candidates from the most to the least conservative.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gradfix.errors import ConfigError
from gradfix.masking import mask_task_vector
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
from gradfix.settings import Engine
from gradfix.task_vector import TaskVector, apply_tensor
from gradfix.votes import SignVotes, estimate_signs

NAIVE = 2.0
"""A gate threshold above 1: no coordinate is ever dropped (naive addition ``θ_B + α τ_A``)."""

DEFAULT_ALPHAS: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 1.5, 2.0)
"""α grid: 0 keeps the target unchanged; 0.02 … 0.2 are small steps (a ratio of 2 to 2.5 between
neighbours: where B and A share no coordinates the useful α is a small step along B's own
descent signs), 0.5 … 2 the full-size transports (α = 1 is τ_A as fine-tuned, up to 2 as in the
paper's sweep). Every candidate costs one forward pass over the held-out shots per fold."""
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.0, 0.2, 0.4, NAIVE)

Score = Callable[[TaskVector, float], float]
"""``score(update, α)``: higher is better (e.g. accuracy of ``θ_B + α · update`` on validation)."""


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


def candidate_key(threshold: float, alpha: float) -> str:
    """The record key of one candidate, e.g. ``"t=0.2,a=1"`` (``t=naive`` above 1)."""
    t = "naive" if threshold > 1 else f"{threshold:g}"
    return f"t={t},a={alpha:g}"


def gate_mask(threshold: float) -> str:
    """The registered mask that writes ``m_t ⊙ τ_A``: ``agreement`` for ``t = 0``, else ``gate``.

    Above 1 the gate keeps every voted coordinate (tensors without votes follow the unvoted policy).
    """
    return "agreement" if threshold == 0 else "gate"


def gated(
    tau: Mapping[str, Tensor], votes: SignVotes | None, threshold: float, unvoted: str = "error"
) -> TaskVector:
    """``m_t ⊙ τ_A`` for the gate threshold ``t`` (``t > 1``: ``τ_A`` itself, no votes needed)."""
    if threshold > 1:
        return TaskVector(dict(tau))
    return mask_task_vector(tau, votes, gate_mask(threshold), threshold=threshold, unvoted=unvoted)


def choose_on_validation(
    tau: Mapping[str, Tensor],
    votes: SignVotes | None,
    score: Score,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    unvoted: str = "error",
) -> Choice:
    """The candidate ``(t, α)`` with the highest ``score(m_t ⊙ τ_A, α)`` (earlier wins ties)."""
    _check_grid(thresholds, alphas)
    scores: dict[str, float] = {}
    best: tuple[float, float, float] | None = None
    for t in thresholds:
        update = gated(tau, votes, t, unvoted)
        for alpha in alphas:
            value = float(score(update, alpha))
            scores[candidate_key(t, alpha)] = value
            if best is None or value > best[0]:
                best = (value, t, alpha)
    assert best is not None
    return Choice(best[1], best[2], best[0], scores, "validation")


def shot_folds(labels: Sequence[Any], folds: int, seed: int = 0) -> list[list[int]]:
    """Split shot indices into ``folds`` folds, spreading each class over the folds (seeded)."""
    if folds < 2:
        raise ConfigError(f"folds must be at least 2, got {folds}")
    if len(labels) < folds:
        raise ConfigError(f"{len(labels)} shot(s) cannot be split into {folds} folds")
    rng = random.Random(seed)
    by_class: dict[Any, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    order: list[int] = []
    for label in sorted(by_class, key=str):
        members = by_class[label]
        rng.shuffle(members)
        order.extend(members)
    out: list[list[int]] = [[] for _ in range(folds)]
    for position, index in enumerate(order):
        out[position % folds].append(index)
    return [sorted(f) for f in out]


@contextmanager
def swapped_weights(
    model: nn.Module, update: Mapping[str, Tensor], alpha: float, theta: Mapping[str, Tensor] | None = None
) -> Iterator[nn.Module]:
    """Inside the block the model's parameters named in ``update`` are ``θ + α · update``.

    ``θ`` is ``theta`` where given, else the weights on entry; the weights on entry are put back
    on exit (also on an error). The sum is computed as the written model's
    (:func:`gradfix.task_vector.apply_tensor`: float32, cast back to the parameter's dtype).
    """
    params = dict(model.named_parameters())
    missing = [n for n in update if n not in params]
    if missing:
        raise ConfigError(f"the task vector names tensors the model lacks: {missing[:5]}")
    saved = {n: params[n].detach().clone() for n in update}
    start = theta if theta is not None else saved
    try:
        with torch.no_grad():
            for name, tau in update.items():
                params[name].copy_(apply_tensor(start[name], tau.to(saved[name].device), alpha))
        yield model
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    theta: Mapping[str, Tensor],
    update: Mapping[str, Tensor],
    alpha: float,
    batch: Any,
    fn: Callable[[nn.Module, Any], Tensor],
) -> Tensor:
    """``fn(model, batch)`` (per sample, as float64 ``[B]``) at ``θ + α · update`` (weights restored)."""
    was_training = model.training
    model.eval()
    try:
        with swapped_weights(model, update, alpha, theta):
            return fn(model, batch).detach().double().reshape(-1)
    finally:
        model.train(was_training)


def mean_loss(
    model: nn.Module,
    theta: Mapping[str, Tensor],
    update: Mapping[str, Tensor],
    alpha: float,
    batch: Any,
    loss_fn: Callable[[nn.Module, Any], Tensor],
) -> float:
    """Mean per-sample loss of ``θ + α · update`` on ``batch`` (weights restored afterwards)."""
    return float(evaluate(model, theta, update, alpha, batch, loss_fn).mean())


def score_on_shots(
    model: nn.Module,
    tau: Mapping[str, Tensor],
    shots: Sequence[Any],
    labels: Sequence[Any],
    collate: Callable[[Sequence[Any]], Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    folds: int = 2,
    seed: int = 0,
    unvoted: str = "error",
    engine: Engine = "auto",
    correct: Callable[[nn.Module, Any], Tensor] | None = None,
) -> FoldScores:
    """The held-out evidence of every candidate ``(t, α)``, by ``folds``-fold cross-validation.

    For each fold ``f``: one vote ``v_{−f}`` on the other folds' shots (the model's current weights
    are ``θ_B``), then for every candidate the per-shot loss of ``θ_B + α (m_t(v_{−f}) ⊙ τ_A)``
    on fold ``f``'s shots, and B's own loss there. The cost is one vote per fold; each candidate
    adds only a forward pass over the held-out shots, so a finer α grid stays cheap.
    ``correct(model, batch)`` (optional, 1/0 per sample) adds the held-out hits for the accuracy
    guard. The model's weights are unchanged afterwards; only parameters with ``requires_grad`` vote.
    """
    _check_grid(thresholds, alphas)
    if len(shots) != len(labels):
        raise ConfigError(f"{len(shots)} shots but {len(labels)} labels")
    theta = {n: p.detach().clone() for n, p in model.named_parameters() if n in tau}
    scores = FoldScores()
    needs_votes = any(t <= 1 for t in thresholds)
    for index, held in enumerate(shot_folds(labels, folds, seed)):
        held_set = set(held)
        voters = [shots[i] for i in range(len(shots)) if i not in held_set]
        votes = (
            estimate_signs(model, [collate(voters)], loss_fn, engine=engine, progress=False)
            if needs_votes and voters
            else None
        )
        batch = collate([shots[i] for i in held])
        base = evaluate(model, theta, {}, 0.0, batch, loss_fn)
        scores.base.append(base)
        scores.fold.append(torch.full((base.numel(),), index, dtype=torch.long))
        if correct is not None:
            scores.base_hits.append(evaluate(model, theta, {}, 0.0, batch, correct))
        for t in thresholds:
            update = gated(tau, votes, t, unvoted) if (votes is not None or t > 1) else TaskVector(dict(tau))
            scores.norms.setdefault(t, []).append(_norm(update))
            for alpha in alphas:
                scores.losses.setdefault((t, alpha), []).append(
                    evaluate(model, theta, update, alpha, batch, loss_fn)
                )
                if correct is not None:
                    scores.hits.setdefault((t, alpha), []).append(
                        evaluate(model, theta, update, alpha, batch, correct)
                    )
    return scores


def choose_on_shots(
    model: nn.Module,
    tau: Mapping[str, Tensor],
    shots: Sequence[Any],
    labels: Sequence[Any],
    collate: Callable[[Sequence[Any]], Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    folds: int = 2,
    seed: int = 0,
    unvoted: str = "error",
    engine: Engine = "auto",
    rule: str = DEFAULT_RULE,
    correct: Callable[[nn.Module, Any], Tensor] | None = None,
    margin: float = DEFAULT_MARGIN,
) -> Choice:
    """Choose ``(t, α)`` from the shots alone: :func:`score_on_shots`, then ``rule``.

    With ``ℓ_i(c)`` the held-out loss of candidate ``c`` on shot ``i`` and ``L(c) = mean_i ℓ_i(c)``:

    - ``no-harm`` (default, :func:`gradfix.methods.shot_rules.no_harm`): B unchanged (α = 0)
      unless a candidate lowers B's held-out loss on every fold and by more than ``margin``
      standard errors, ``min_f D_f(c) > 0`` and ``d̄(c) − z·SE(c) > 0`` with ``d_i = ℓ_i(B) − ℓ_i(c)``;
      then the largest such lower bound. A grid without α = 0 (the user excluded B) gets the
      candidate with the largest lower bound instead;
    - ``min``: the candidate minimising ``L``;
    - ``one-se``: among the candidates whose ``L`` is within one standard error of the minimum, the
      one that moves B least (the smallest ``α · mean_f ‖m_t(v_{−f}) ⊙ τ_A‖``).

    ``correct(model, batch)`` (optional, per-sample 1/0 for a right/wrong prediction) guards
    against a loss that falls while accuracy falls too: a candidate whose held-out accuracy is
    below B's own is never chosen (B itself always qualifies).

    The model's weights are unchanged afterwards. ``score`` in the result is ``−L`` of the chosen
    candidate (higher is better, as for validation).
    """
    if rule not in RULES:
        raise ConfigError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    scores = score_on_shots(
        model, tau, shots, labels, collate, loss_fn, thresholds, alphas, folds, seed, unvoted, engine, correct
    )
    return scores.choose(rule, margin)


@dataclass
class FoldScores:
    """Held-out per-sample losses (and hits) of every candidate ``(t, α)`` and of B, per fold."""

    losses: dict[Candidate, list[Tensor]] = field(default_factory=dict)
    hits: dict[Candidate, list[Tensor]] = field(default_factory=dict)
    base: list[Tensor] = field(default_factory=list)
    base_hits: list[Tensor] = field(default_factory=list)
    fold: list[Tensor] = field(default_factory=list)
    norms: dict[float, list[float]] = field(default_factory=dict)

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
        """The candidate of ``rule`` (see :func:`choose_on_shots`) as a :class:`Choice`."""
        if rule not in RULES:
            raise ConfigError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
        per_sample = {key: torch.cat(parts) for key, parts in self.losses.items()}
        base, folds = torch.cat(self.base), torch.cat(self.fold)
        allowed = self.allowed()
        chosen: Candidate | None
        if rule == "min":
            chosen = lowest(per_sample, allowed)
        elif rule == "one-se":
            chosen = one_standard_error(per_sample, allowed, self._size)
        else:
            chosen = no_harm(per_sample, base, folds, allowed, margin)
        mean = {key: -_finite_mean(v) for key, v in per_sample.items()}
        scores = {candidate_key(t, a): v for (t, a), v in mean.items()}
        source = f"{len(self.base)}-fold shots, {rule} rule"
        if chosen is None:  # B unchanged where the grid allows it, else the best lower bound
            kept = [key for key in self.losses if key[1] == 0]
            chosen = kept[0] if kept else best_bound(per_sample, base, folds, allowed, margin)
        return Choice(chosen[0], chosen[1], mean[chosen], scores, source)

    def _size(self, key: Candidate) -> float:
        norms = self.norms[key[0]]
        return abs(key[1]) * sum(norms) / len(norms)


def _finite_mean(values: Tensor) -> float:
    return float(values.mean()) if bool(torch.isfinite(values).all()) else math.inf


def _norm(update: Mapping[str, Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))


def _check_grid(thresholds: Iterable[float], alphas: Iterable[float]) -> None:
    thresholds, alphas = list(thresholds), list(alphas)
    if not thresholds or not alphas:
        raise ConfigError("the candidate grid needs at least one threshold and one α")
    bad = [t for t in thresholds if not math.isfinite(t) or t < 0]
    if bad:
        raise ConfigError(f"gate thresholds must be finite and ≥ 0, got {bad}")
    bad = [a for a in alphas if not math.isfinite(a)]
    if bad:
        raise ConfigError(f"α values must be finite, got {bad}")
