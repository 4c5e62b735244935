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
When the default α grid's largest value (2) wins for a threshold (or overall), both choices also
try that threshold at the larger steps :data:`~gradfix.methods.candidates.GROWN_ALPHAS` (3 … 8):
far from A the useful step can be larger.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from torch import Tensor, nn

from gradfix.errors import ConfigError
from gradfix.masking import mask_task_vector
from gradfix.methods.candidates import (
    DEFAULT_ALPHAS,
    DEFAULT_THRESHOLDS,
    GROWN_ALPHAS,
    NAIVE,
    Choice,
    best_candidate,
    candidate_key,
    check_grid,
    larger_steps,
    top_wins,
)
from gradfix.methods.fold_scores import FoldScores
from gradfix.methods.shot_rules import DEFAULT_MARGIN, DEFAULT_RULE, RULES
from gradfix.settings import Engine
from gradfix.task_vector import TaskVector, apply_tensor
from gradfix.votes import SignVotes, estimate_signs

if TYPE_CHECKING:
    from typing_extensions import Unpack

Score = Callable[[TaskVector, float], float]
"""``score(update, α)``: higher is better (e.g. accuracy of ``θ_B + α · update`` on validation)."""
FoldSigns = Callable[[nn.Module, Any], SignVotes]
"""``(model, batch of one fold's voters) -> votes``: a sign estimate other than the per-sample vote."""


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
    grown: Sequence[float] | None = None,
) -> Choice:
    """The candidate ``(t, α)`` with the highest ``score(m_t ⊙ τ_A, α)`` (earlier wins ties).

    A threshold is also scored at the larger steps ``grown`` (those above the grid; by default
    :data:`GROWN_ALPHAS` for the default grid and none for another, see :func:`larger_steps`) when
    its own best α is the grid's largest, or the best of every threshold is: naive addition may
    peak past the grid while a mask peaks inside it. The best of all scored is kept.
    """
    check_grid(thresholds, alphas)
    scores: dict[str, float] = {}
    alive: dict[float, TaskVector] = {}  # one masked update at a time (memory of a large model)

    def score_at(t: float, alpha: float) -> float:
        if t not in alive:
            alive.clear()
            alive[t] = gated(tau, votes, t, unvoted)
        scores[candidate_key(t, alpha)] = float(score(alive[t], alpha))
        return scores[candidate_key(t, alpha)]

    t, alpha = best_candidate(score_at, thresholds, alphas, grown)
    return Choice(t, alpha, scores[candidate_key(t, alpha)], scores, "validation")


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
    grown: Sequence[float] | None = None,
    fold_signs: FoldSigns | None = None,
) -> FoldScores:
    """The held-out evidence of every candidate ``(t, α)``, by ``folds``-fold cross-validation.

    For each fold ``f``: one vote ``v_{−f}`` on the other folds' shots (the model's current weights
    are ``θ_B``), then for every candidate the per-shot loss of ``θ_B + α (m_t(v_{−f}) ⊙ τ_A)``
    on fold ``f``'s shots, and B's own loss there. The cost is one vote per fold; each candidate
    adds only a forward pass over the held-out shots, so a finer α grid stays cheap.
    ``correct(model, batch)`` (optional, 1/0 per sample) adds the held-out hits for the accuracy
    guard. The model's weights are unchanged afterwards; only parameters with ``requires_grad`` vote.
    The larger steps ``grown`` (:func:`larger_steps`) are scored too; a rule considers a threshold's
    only when its own pick, or the overall one, is the grid's largest α (:meth:`FoldScores.choose`).
    ``fold_signs(model, batch)`` replaces the per-sample vote of each fold (e.g.
    :func:`gradfix.votes.finetune_signs`); it must leave the model's weights as it found them.
    """
    check_grid(thresholds, alphas)
    scored = [*alphas, *larger_steps(alphas, grown)]
    if len(shots) != len(labels):
        raise ConfigError(f"{len(shots)} shots but {len(labels)} labels")
    theta = {n: p.detach().clone() for n, p in model.named_parameters() if n in tau}
    scores = FoldScores(grid=tuple(alphas))
    needs_votes = any(t <= 1 for t in thresholds)
    signs_of = fold_signs or (
        lambda model, batch: estimate_signs(model, [batch], loss_fn, engine=engine, progress=False)
    )
    for index, held in enumerate(shot_folds(labels, folds, seed)):
        held_set = set(held)
        voters = [shots[i] for i in range(len(shots)) if i not in held_set]
        votes = signs_of(model, collate(voters)) if needs_votes and voters else None
        batch = collate([shots[i] for i in held])
        base = evaluate(model, theta, {}, 0.0, batch, loss_fn)
        scores.base.append(base)
        scores.fold.append(torch.full((base.numel(),), index, dtype=torch.long))
        if correct is not None:
            scores.base_hits.append(evaluate(model, theta, {}, 0.0, batch, correct))
        for t in thresholds:
            update = gated(tau, votes, t, unvoted) if (votes is not None or t > 1) else TaskVector(dict(tau))
            scores.norms.setdefault(t, []).append(_norm(update))
            for alpha in scored:
                scores.losses.setdefault((t, alpha), []).append(
                    evaluate(model, theta, update, alpha, batch, loss_fn)
                )
                if correct is not None:
                    scores.hits.setdefault((t, alpha), []).append(
                        evaluate(model, theta, update, alpha, batch, correct)
                    )
            del update  # one masked update alive at a time (memory of a large model)
        del votes  # freed before the next fold's estimate, not after it
    return scores


class ShotKeywords(TypedDict, total=False):
    """The keyword arguments of :func:`score_on_shots` that :func:`choose_on_shots` passes on."""

    folds: int
    seed: int
    unvoted: str
    engine: Engine
    correct: Callable[[nn.Module, Any], Tensor] | None
    grown: Sequence[float] | None
    fold_signs: FoldSigns | None


def choose_on_shots(
    model: nn.Module,
    tau: Mapping[str, Tensor],
    shots: Sequence[Any],
    labels: Sequence[Any],
    collate: Callable[[Sequence[Any]], Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    *,
    rule: str = DEFAULT_RULE,
    margin: float = DEFAULT_MARGIN,
    **scoring: Unpack[ShotKeywords],
) -> Choice:
    """Choose ``(t, α)`` from the shots alone: :func:`score_on_shots`, then ``rule``.

    Every argument but ``rule`` and ``margin`` goes to :func:`score_on_shots` (with its defaults);
    past ``alphas`` they are keywords (:class:`ShotKeywords`).

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
    candidate (higher is better, as for validation). When a threshold's own pick (or the overall
    one) is the grid's largest α, the rule chooses again with that threshold's larger steps ``grown``.
    """
    if rule not in RULES:
        raise ConfigError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    scores = score_on_shots(model, tau, shots, labels, collate, loss_fn, thresholds, alphas, **scoring)
    return scores.choose(rule, margin)


def _norm(update: Mapping[str, Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))


__all__ = [
    "DEFAULT_ALPHAS",
    "DEFAULT_THRESHOLDS",
    "GROWN_ALPHAS",
    "NAIVE",
    "Choice",
    "FoldScores",
    "ShotKeywords",
    "best_candidate",
    "candidate_key",
    "choose_on_shots",
    "choose_on_validation",
    "evaluate",
    "gate_mask",
    "gated",
    "larger_steps",
    "mean_loss",
    "score_on_shots",
    "shot_folds",
    "swapped_weights",
    "top_wins",
]
