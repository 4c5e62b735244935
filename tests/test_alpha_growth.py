"""The α grid grows past its largest value only when that value wins (validation, shots, CLI plan)."""

from __future__ import annotations

import pytest
import torch

from gradfix import SignVotes
from gradfix.methods.adaptive import choice_grid
from gradfix.methods.autotune import (
    DEFAULT_ALPHAS,
    GROWN_ALPHAS,
    FoldScores,
    choose_on_validation,
    top_wins,
)
from gradfix.methods.registry import resolve_method
from gradfix.settings import MaskSettings

TAU = {"w": torch.ones(3)}


def _peaked_at(peak: float):
    """A validation score that rises with α up to ``peak`` and falls after it."""
    return lambda update, alpha: -abs(alpha - peak)


def test_top_wins_only_for_the_largest_moving_alpha() -> None:
    assert top_wins(2.0, DEFAULT_ALPHAS)
    assert not top_wins(1.5, DEFAULT_ALPHAS)
    assert not top_wins(0.0, (0.0,))


def test_validation_grows_the_grid_when_its_largest_alpha_wins() -> None:
    choice = choose_on_validation(TAU, None, _peaked_at(5.0), thresholds=[2.0])
    assert choice.alpha == 5.0
    assert {f"t=naive,a={a:g}" for a in GROWN_ALPHAS} <= set(choice.scores)
    kept = choose_on_validation(TAU, None, _peaked_at(5.0), thresholds=[2.0], grown=())
    assert kept.alpha == 2.0 and "t=naive,a=3" not in kept.scores


def test_validation_does_not_look_past_the_grid_when_a_smaller_alpha_wins() -> None:
    def score(update, alpha):  # best at 1 inside the grid, but 8 would score higher still
        return 10.0 if alpha == 8.0 else -abs(alpha - 1.0)

    choice = choose_on_validation(TAU, None, score, thresholds=[2.0])
    assert choice.alpha == 1.0
    assert "t=naive,a=8" not in choice.scores


def _fold_scores(gain_at: dict[float, float]) -> FoldScores:
    """Two folds of 4 shots, B's loss 2, each candidate (0, α) improving every shot by ``gain_at[α]``."""
    base = torch.full((8,), 2.0, dtype=torch.float64)
    folds = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    scores = FoldScores(base=[base[:4], base[4:]], fold=[folds[:4], folds[4:]], norms={0.0: [1.0, 1.0]})
    scores.grid = (0.0, 1.0, 2.0)
    for alpha, gain in gain_at.items():
        noise = torch.tensor([0.01, -0.01] * 4, dtype=torch.float64)
        loss = base - gain - noise * (gain != 0)
        scores.losses[(0.0, alpha)] = [loss[:4], loss[4:]]
    return scores


@pytest.mark.parametrize("rule", ["no-harm", "min", "one-se"])
def test_shot_rules_reach_the_grown_steps_only_when_the_grid_top_wins(rule: str) -> None:
    rising = _fold_scores({0.0: 0.0, 1.0: 0.2, 2.0: 0.4, 3.0: 0.6, 4.0: 0.9, 5.0: 0.5})
    assert rising.choose(rule).alpha == 4.0
    inside = _fold_scores({0.0: 0.0, 1.0: 0.5, 2.0: 0.3, 3.0: 0.9})
    assert inside.choose(rule).alpha == 1.0


def test_the_cli_plan_grows_the_default_grid_but_not_a_grid_the_user_gave() -> None:
    default = choice_grid(*resolve_method("adaptive", MaskSettings()))
    assert default is not None and default.grown == GROWN_ALPHAS
    given = choice_grid(*resolve_method("adaptive", MaskSettings(alphas=[0.0, 1.0])))
    assert given is not None and given.grown == ()


def test_validation_grows_a_threshold_whose_own_best_is_the_grid_top() -> None:
    def score(update, alpha):  # the mask (t=0) peaks inside the grid at 1.5; naive rises to 6
        mask = not torch.equal(update["w"], torch.ones(3))
        return (0.3 - abs(alpha - 1.5) / 10) if mask else (0.32 - abs(alpha - 6.0) / 100)

    tau = {"w": torch.tensor([1.0, 1.0, 1.0])}
    votes = SignVotes({"w": torch.tensor([1, -1, -1], dtype=torch.int8)}, {}, 1, hits={"w": 1})
    choice = choose_on_validation(tau, votes, score, thresholds=[0.0, 2.0])
    assert (choice.threshold, choice.alpha) == (2.0, 6.0)
    assert "t=naive,a=6" in choice.scores and "t=0,a=3" not in choice.scores  # only naive grew


def _two_threshold_scores(gains: dict[tuple[float, float], float]) -> FoldScores:
    """Two folds of 4 shots, B's loss 2; each candidate ``(t, α)`` improving every shot by its gain."""
    base = torch.full((8,), 2.0, dtype=torch.float64)
    folds = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    norms = {0.0: [1.0, 1.0], 2.0: [1.0, 1.0]}
    scores = FoldScores(base=[base[:4], base[4:]], fold=[folds[:4], folds[4:]], norms=norms)
    scores.grid = (0.0, 1.0, 2.0)
    noise = torch.tensor([0.01, -0.01] * 4, dtype=torch.float64)
    for key, gain in gains.items():
        loss = base - gain - noise * (gain != 0)
        scores.losses[key] = [loss[:4], loss[4:]]
    return scores


@pytest.mark.parametrize("rule", ["no-harm", "min"])
def test_shot_rules_grow_a_threshold_whose_own_pick_is_the_grid_top(rule: str) -> None:
    mask = {(0.0, 0.0): 0.0, (0.0, 1.0): 0.5, (0.0, 2.0): 0.3, (0.0, 3.0): 0.2}
    naive = {(2.0, 0.0): 0.0, (2.0, 1.0): 0.1, (2.0, 2.0): 0.4, (2.0, 3.0): 0.6, (2.0, 4.0): 0.9}
    assert _two_threshold_scores({**mask, **naive}).choose(rule).alpha == 4.0
    flat = {**naive, (2.0, 3.0): 0.45, (2.0, 4.0): 0.45}  # naive grows but stays under the mask
    assert _two_threshold_scores({**mask, **flat}).choose(rule).alpha == 1.0
