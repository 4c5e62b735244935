"""The rules that choose (t, α) from held-out losses on folds of the shots, on hand-made fold scores."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from gradfix.methods.adaptive import choice_grid
from gradfix.methods.autotune import (
    DEFAULT_ALPHAS,
    GROWN_ALPHAS,
    NAIVE,
    FoldScores,
    choose_on_shots,
    score_on_shots,
)
from gradfix.methods.registry import resolve_method
from gradfix.methods.shot_rules import best_bound, improvement, lowest, no_harm, one_standard_error
from gradfix.settings import MaskSettings

FOLDS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
BASE = torch.full((8,), 2.0, dtype=torch.float64)


def _losses(*gains: list[float]) -> dict[tuple[float, float], Tensor]:
    """Candidates (NAIVE, 1), (NAIVE, 2), … whose held-out improvements over B are ``gains``."""
    return {(NAIVE, float(i + 1)): BASE - torch.tensor(g, dtype=torch.float64) for i, g in enumerate(gains)}


def test_improvement_is_the_paired_mean_its_standard_error_and_the_worst_fold() -> None:
    d = [1.0, 2.0, 3.0, 4.0, 0.5, 0.5, 0.5, 0.5]
    gain = improvement(BASE - torch.tensor(d, dtype=torch.float64), BASE, FOLDS)
    t = torch.tensor(d, dtype=torch.float64)
    assert gain.mean == pytest.approx(float(t.mean()))
    assert gain.se == pytest.approx(float(t.std()) / math.sqrt(8))
    assert gain.worst_fold == pytest.approx(0.5)
    assert gain.bound(2.0) == pytest.approx(gain.mean - 2 * gain.se)
    broken = improvement(torch.tensor([math.nan] * 8, dtype=torch.float64), BASE, FOLDS)
    assert broken.mean == -math.inf and broken.bound(1.0) == -math.inf


def test_no_harm_keeps_b_when_one_fold_gets_worse_although_the_mean_is_sure() -> None:
    # a large gain on fold 0, a small loss on fold 1: mean 0.95, SE 0.39, but fold 1 is worse
    losses = _losses([2.0, 2.0, 2.0, 2.0, -0.1, -0.1, -0.1, -0.1])
    key = (NAIVE, 1.0)
    gain = improvement(losses[key], BASE, FOLDS)
    assert gain.bound(1.0) > 0 and gain.worst_fold < 0
    assert no_harm(losses, BASE, FOLDS, [key]) is None
    # the loss-minimising rules would take it
    assert lowest({**losses, (NAIVE, 0.0): BASE}, [(NAIVE, 0.0), key]) == key


def test_no_harm_keeps_b_when_the_gain_is_within_one_standard_error() -> None:
    # better on both folds on average (0.25 each), but the shots disagree: SE ≈ 1.04
    losses = _losses([3.0, -2.5, 3.0, -2.5, 3.0, -2.5, 3.0, -2.5])
    key = (NAIVE, 1.0)
    assert improvement(losses[key], BASE, FOLDS).worst_fold > 0
    assert no_harm(losses, BASE, FOLDS, [key]) is None
    assert no_harm(losses, BASE, FOLDS, [key], margin=0.0) == key  # z = 0: only the folds' signs


def test_no_harm_takes_the_largest_lower_bound_not_the_largest_mean() -> None:
    steady = [1.0, 1.1, 0.9, 1.0, 1.0, 1.1, 0.9, 1.0]  # mean 1.0, bound ≈ 0.97
    wild = [4.0, 0.1, 4.0, 0.1, 4.0, 0.1, 4.0, 0.1]  # mean 2.05, bound ≈ 1.31 at z = 1, < 0.97 at z = 2
    losses = _losses(steady, wild)
    keys = list(losses)
    assert no_harm(losses, BASE, FOLDS, keys, margin=1.0) == keys[1]
    assert no_harm(losses, BASE, FOLDS, keys, margin=2.0) == keys[0]
    assert no_harm(losses, BASE, FOLDS, keys[:1], margin=2.0) == keys[0]  # the guard's list is obeyed
    assert best_bound(losses, BASE, FOLDS, keys, margin=2.0) == keys[0]


def test_one_standard_error_prefers_the_smallest_update_within_noise() -> None:
    losses = {(NAIVE, 0.0): BASE, **_losses([0.1, -0.1, 0.2, -0.1, 0.1, 0.0, 0.1, -0.1])}
    keys = list(losses)
    assert lowest(losses, keys) == keys[1]
    assert one_standard_error(losses, keys, size=lambda key: key[1]) == keys[0]


def _scores(gains: dict[float, list[float]], hits: dict[float, list[float]] | None = None) -> FoldScores:
    """Fold scores of candidates (0, α) with the given per-shot improvements over B (2 folds)."""
    scores = FoldScores(base=[BASE[:4], BASE[4:]], fold=[FOLDS[:4], FOLDS[4:]], norms={0.0: [1.0, 1.0]})
    for alpha, gain in gains.items():
        loss = BASE - torch.tensor(gain, dtype=torch.float64)
        scores.losses[(0.0, alpha)] = [loss[:4], loss[4:]]
    if hits is not None:
        scores.base_hits = [torch.ones(4, dtype=torch.float64)] * 2
        for alpha, hit in hits.items():
            scores.hits[(0.0, alpha)] = [torch.tensor(hit[:4]).double(), torch.tensor(hit[4:]).double()]
    return scores


def test_fold_scores_choose_keeps_alpha_zero_unless_a_candidate_is_sure() -> None:
    noisy = {0.0: [0.0] * 8, 0.1: [3.0, -2.5] * 4, 1.0: [2.0] * 4 + [-0.1] * 4}
    choice = _scores(noisy).choose()
    assert (choice.threshold, choice.alpha) == (0.0, 0.0)
    assert choice.source == "2-fold shots, no-harm rule"
    assert choice.score == pytest.approx(-2.0) == choice.scores["t=0,a=0"]
    assert _scores(noisy).choose("min").alpha == 1.0  # the plain minimum would move B
    sure = {**noisy, 0.05: [0.3, 0.35, 0.3, 0.25] * 2}
    assert _scores(sure).choose().alpha == 0.05


def test_fold_scores_never_choose_a_candidate_less_accurate_than_b_on_the_held_out_shots() -> None:
    gains = {0.0: [0.0] * 8, 0.5: [1.0] * 8, 0.2: [0.4, 0.5] * 4}
    hits = {0.0: [1.0] * 8, 0.5: [1.0] * 7 + [0.0], 0.2: [1.0] * 8}
    assert _scores(gains).choose().alpha == 0.5
    assert _scores(gains, hits).choose().alpha == 0.2


def test_a_grid_without_alpha_zero_gets_the_best_lower_bound() -> None:
    gains = {0.5: [0.2, -0.3] * 4, 1.0: [0.5, -1.5] * 4}  # neither sure; 0.5 hurts less
    choice = _scores(gains).choose()
    assert choice.alpha == 0.5 and choice.score == choice.scores["t=0,a=0.5"]


class _Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1, dtype=torch.float64))


def _collate(items: list[float]) -> Tensor:
    return torch.tensor(list(items), dtype=torch.float64)


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ([1.0, 1.01, 0.99, 1.0, 1.02, 0.98, 1.0, 1.0], 1.0),  # every shot wants α ≈ 1
        ([3.3, -2.7, 3.4, -2.8, 3.2, -2.6, 3.3, -2.7], 0.0),  # α = 0.5 lowest on average, not sure
        ([-1.0, -1.1, -0.9, -1.0, -1.0, -1.1, -0.9, -1.0], 0.0),  # τ_A points the wrong way
    ],
)
def test_the_default_rule_of_choose_on_shots_moves_b_only_on_clear_evidence(targets, expected) -> None:
    model = _Scalar()
    tau = {"w": torch.ones(1, dtype=torch.float64)}

    def loss(m: nn.Module, batch: Tensor) -> Tensor:
        return (m.w - batch) ** 2  # ℓ_i(α) = (α − a_i)²

    alphas = (0.0, 0.05, 0.5, 1.0, 1.5)
    choice = choose_on_shots(model, tau, targets, [0, 1] * 4, _collate, loss, (NAIVE,), alphas)
    assert choice.alpha == expected and choice.source == "2-fold shots, no-harm rule"
    assert float(model.w.detach()) == 0.0


def test_the_default_grid_has_small_steps_and_a_finer_grid_costs_no_more_votes() -> None:
    assert DEFAULT_ALPHAS[0] == 0.0 and list(DEFAULT_ALPHAS) == sorted(DEFAULT_ALPHAS)
    assert {0.02, 0.05, 0.1, 0.2} <= set(DEFAULT_ALPHAS) and max(DEFAULT_ALPHAS) == 2.0
    plan = choice_grid(*resolve_method("adaptive", MaskSettings()))
    assert plan is not None and plan.alphas == list(DEFAULT_ALPHAS)

    model = nn.Linear(3, 2).double()
    tau = {n: torch.full_like(p, 0.1) for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    shots = [(torch.randn(3, generator=g, dtype=torch.float64), i % 2) for i in range(8)]

    def collate(items):
        return {"x": torch.stack([x for x, _ in items]), "y": torch.tensor([y for _, y in items])}

    def counted(grid: tuple[float, ...]) -> tuple[int, int]:
        calls = {"grad": 0, "eval": 0}

        def loss(m: nn.Module, batch) -> Tensor:
            calls["grad" if torch.is_grad_enabled() else "eval"] += 1
            return nn.functional.cross_entropy(m(batch["x"]), batch["y"], reduction="none")

        scores = score_on_shots(model, tau, shots, [y for _, y in shots], collate, loss, (0.0, NAIVE), grid)
        scored = len(grid) + (len(GROWN_ALPHAS) if grid == DEFAULT_ALPHAS else 0)  # the larger steps too
        assert len(scores.losses) == 2 * scored and len(scores.base) == 2
        return calls["grad"], calls["eval"]

    coarse, fine = counted((0.0, 0.5, 1.0)), counted(DEFAULT_ALPHAS)
    assert coarse[0] == fine[0] > 0  # the votes: the same per fold whatever the grid
    scored = len(DEFAULT_ALPHAS) + len(GROWN_ALPHAS)
    assert coarse[1] == 2 * (1 + 2 * 3) and fine[1] == 2 * (1 + 2 * scored)  # one pass each
