"""Choosing α and the gate threshold ``t`` without a test set.

Two sources of evidence, as a user has them:

- a **validation file**: :func:`choose_on_validation` scores every candidate ``(t, α)`` by a
  user-given score (validation accuracy) and keeps the best;
- **only the few shots**: :func:`choose_on_shots` splits the shots into folds; for each fold it
  votes with the other folds, masks ``τ_A`` with those votes and measures the mean loss of
  ``θ_B + α · (m_t ⊙ τ_A)`` on the held-back fold; the candidate with the lowest loss summed over
  folds wins (cross-validation over the shots; the final model then votes on every shot).

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
from gradfix.settings import Engine
from gradfix.task_vector import TaskVector, apply_tensor
from gradfix.votes import SignVotes, estimate_signs

NAIVE = 2.0
"""A gate threshold above 1: no coordinate is ever dropped (naive addition ``θ_B + α τ_A``)."""

DEFAULT_ALPHAS: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)
"""α grid; 0 keeps the target unchanged, the choice when no candidate beats it."""
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


RULES = ("one-se", "min")


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
    rule: str = "one-se",
    correct: Callable[[nn.Module, Any], Tensor] | None = None,
) -> Choice:
    """Choose ``(t, α)`` from the shots alone, by ``folds``-fold cross-validation of the loss.

    For each fold ``f``: votes ``v_{−f}`` on the other folds' shots (the model's current weights
    are ``θ_B``), then for every candidate ``c = (t, α)`` the loss ``ℓ_i(c)`` of ``θ_B + α
    (m_t(v_{−f}) ⊙ τ_A)`` on each held-back shot ``i`` of fold ``f``; ``L(c) = mean_i ℓ_i(c)``
    over all shots. ``rule``:

    - ``min``: the candidate minimising ``L``;
    - ``one-se`` (default, the one-standard-error rule): among the candidates whose ``L`` is within
      one standard error of the minimum, ``L(c) − L(c*) ≤ sd_i(ℓ_i(c) − ℓ_i(c*)) / √n``, the
      one that moves B least, i.e. with the smallest ``α · mean_f ‖m_t(v_{−f}) ⊙ τ_A‖``. A few
      shots estimate ``L`` noisily; this keeps B unchanged (α = 0) or the update small unless the
      shots give clear evidence for more.

    ``correct(model, batch)`` (optional, per-sample 1/0 for a right/wrong prediction) guards
    against a loss that falls while accuracy falls too (e.g. less confident but more often wrong
    predictions): a candidate whose held-out accuracy is below B's own (``α = 0``) is never chosen,
    and ``c*`` is the minimiser among the others (B itself always qualifies).

    The model's weights are unchanged afterwards; only parameters with ``requires_grad`` vote.
    ``score`` in the result is ``−L`` of the chosen candidate (higher is better, as for validation).
    """
    _check_grid(thresholds, alphas)
    if rule not in RULES:
        raise ConfigError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    if len(shots) != len(labels):
        raise ConfigError(f"{len(shots)} shots but {len(labels)} labels")
    theta = {n: p.detach().clone() for n, p in model.named_parameters() if n in tau}
    scores = _FoldScores()
    for held in shot_folds(labels, folds, seed):
        held_set = set(held)
        voters = [shots[i] for i in range(len(shots)) if i not in held_set]
        needs_votes = any(t <= 1 for t in thresholds)
        votes = (
            estimate_signs(model, [collate(voters)], loss_fn, engine=engine, progress=False)
            if needs_votes and voters
            else None
        )
        batch = collate([shots[i] for i in held])
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
    return scores.choose(rule, f"{folds}-fold shots, {rule} rule")


Candidate = tuple[float, float]


@dataclass
class _FoldScores:
    """Held-out per-sample losses (and hits) of every candidate ``(t, α)``, gathered over the folds."""

    losses: dict[Candidate, list[Tensor]] = field(default_factory=dict)
    hits: dict[Candidate, list[Tensor]] = field(default_factory=dict)
    base_hits: list[Tensor] = field(default_factory=list)
    norms: dict[float, list[float]] = field(default_factory=dict)

    def allowed(self, mean: Mapping[Candidate, float]) -> list[Candidate]:
        """The candidates at least as accurate as B on the held-out shots (all without hits)."""
        if not self.hits:
            return list(mean)
        accuracy = {key: float(torch.cat(parts).mean()) for key, parts in self.hits.items()}
        floor = float(torch.cat(self.base_hits).mean())
        allowed = [key for key in mean if accuracy[key] >= floor - 1e-12]
        # α = 0 not in the grid and every candidate below B: the least harmful
        return allowed or [max(accuracy, key=lambda k: accuracy[k])]

    def choose(self, rule: str, source: str) -> Choice:
        """The candidate of ``rule`` (``min``, or ``one-se``: the smallest update within one SE)."""
        per_sample = {key: torch.cat(parts) for key, parts in self.losses.items()}
        mean = {
            key: float(v.mean()) if bool(torch.isfinite(v).all()) else math.inf
            for key, v in per_sample.items()
        }
        allowed = self.allowed(mean)
        best = min(allowed, key=lambda k: mean[k])
        chosen = best
        if rule == "one-se" and math.isfinite(mean[best]):
            n = per_sample[best].numel()

            def within(key: Candidate) -> bool:
                if not math.isfinite(mean[key]):
                    return False
                spread = float((per_sample[key] - per_sample[best]).std()) if n > 1 else 0.0
                return mean[key] - mean[best] <= spread / math.sqrt(n)

            def size(key: Candidate) -> float:
                return abs(key[1]) * sum(self.norms[key[0]]) / len(self.norms[key[0]])

            chosen = min((key for key in allowed if within(key)), key=size)
        scores = {candidate_key(t, a): -v for (t, a), v in mean.items()}
        return Choice(chosen[0], chosen[1], -mean[chosen], scores, source)


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
