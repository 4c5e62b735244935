"""Choosing the gate threshold t and α (gradfix.methods.autotune), checked by hand on small problems."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from gradfix import SignVotes
from gradfix.errors import ConfigError
from gradfix.methods.autotune import (
    NAIVE,
    candidate_key,
    choose_on_shots,
    choose_on_validation,
    mean_loss,
    shot_folds,
)

TAU = {"w": torch.tensor([0.5, -0.2, 0.3, 0.1])}
# vote margins v/n = [0.6, 0.2, −0.2, −1.0]; opposition −sign(τ)·μ = [−0.6, 0.2, 0.2, 1.0]
VOTES = SignVotes(
    {"w": torch.tensor([3, 1, -1, -5], dtype=torch.int8)}, {"w": torch.zeros(4)}, 5, hits={"w": 5}
)
GATED = {  # m_t ⊙ τ by hand
    0.0: [0.5, 0.0, 0.0, 0.0],
    0.5: [0.5, -0.2, 0.3, 0.0],
    NAIVE: [0.5, -0.2, 0.3, 0.1],
}


def test_choose_on_validation_picks_the_argmax_and_the_earlier_candidate_on_a_tie() -> None:
    table = {(0.0, 0.5): 0.7, (0.5, 1.0): 0.9, (NAIVE, 0.5): 0.9, (NAIVE, 1.0): 0.2}  # the rest: 0
    seen: list[tuple[list[float], float]] = []

    def score(update: Any, alpha: float) -> float:
        values = update["w"].tolist()
        seen.append((values, alpha))
        t = next(t for t, hand in GATED.items() if values == pytest.approx(hand))
        return table.get((t, alpha), 0.0)

    choice = choose_on_validation(TAU, VOTES, score, thresholds=(0.0, 0.5, NAIVE), alphas=(0.5, 1.0))
    assert (choice.threshold, choice.alpha, choice.score, choice.source) == (0.5, 1.0, 0.9, "validation")
    assert choice.scores == {
        candidate_key(t, a): table.get((t, a), 0.0) for t in (0.0, 0.5, NAIVE) for a in (0.5, 1.0)
    }
    assert [a for _, a in seen] == [0.5, 1.0] * 3
    for (values, _), t in zip(seen, [0.0, 0.0, 0.5, 0.5, NAIVE, NAIVE], strict=True):
        assert values == pytest.approx(GATED[t])
    # the same tie, the other order: the naive candidate comes first and wins
    flipped = choose_on_validation(TAU, VOTES, score, thresholds=(NAIVE, 0.5, 0.0), alphas=(0.5, 1.0))
    assert (flipped.threshold, flipped.alpha) == (NAIVE, 0.5)
    assert choice.to_dict() == {
        "threshold": 0.5,
        "alpha": 1.0,
        "score": 0.9,
        "source": "validation",
        "scores": choice.scores,
    }
    assert candidate_key(NAIVE, 0.25) == "t=naive,a=0.25" and candidate_key(0.2, 1.0) == "t=0.2,a=1"
    with pytest.raises(ConfigError, match="at least one"):
        choose_on_validation(TAU, VOTES, score, thresholds=(), alphas=(1.0,))
    with pytest.raises(ConfigError, match="finite and ≥ 0"):
        choose_on_validation(TAU, VOTES, score, thresholds=(-0.1,), alphas=(1.0,))


def test_shot_folds_spread_every_class_and_are_deterministic() -> None:
    labels = ["a", "b", "a", "c", "a", "b", "a", "b", "c", "a", "b"]  # a: 5, b: 4, c: 2
    folds = shot_folds(labels, 2, seed=3)
    assert sorted(i for f in folds for i in f) == list(range(len(labels)))  # a partition
    assert all(f == sorted(f) for f in folds)
    for label, n in {"a": 5, "b": 4, "c": 2}.items():
        per_fold = [sum(labels[i] == label for i in f) for f in folds]
        assert sum(per_fold) == n and max(per_fold) - min(per_fold) <= 1, (label, per_fold)
    assert shot_folds(labels, 2, seed=3) == folds
    assert any(shot_folds(labels, 2, seed=s) != folds for s in range(10))  # the seed matters
    three = shot_folds(labels, 3, seed=0)
    assert len(three) == 3 and all(len({labels[i] for i in f} & {"a", "b"}) == 2 for f in three)
    with pytest.raises(ConfigError, match="cannot be split"):
        shot_folds(["a"], 2)
    with pytest.raises(ConfigError, match="at least 2"):
        shot_folds(labels, 1)


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def _collate(items: list[tuple[Tensor, int]]) -> dict[str, Tensor]:
    return {"x": torch.stack([x for x, _ in items]), "y": torch.tensor([y for _, y in items])}


def _loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def _shots(n_per_class: int, seed: int) -> list[tuple[Tensor, int]]:
    g = torch.Generator().manual_seed(seed)
    shots = []
    for i in range(2 * n_per_class):
        y = i % 2
        x = torch.randn(3, generator=g, dtype=torch.float64) + (1.5 if y else -1.5)
        shots.append((x, y))
    return shots


def _hand_counts(model: nn.Module, items: list[tuple[Tensor, int]]) -> dict[str, Tensor]:
    """Σ_j sign(−g^(j)) with one autograd call per sample."""
    params = dict(model.named_parameters())
    counts = {n: torch.zeros_like(p) for n, p in params.items()}
    for x, y in items:
        loss = F.cross_entropy(model(x[None]), torch.tensor([y]))
        grads = torch.autograd.grad(loss, list(params.values()))
        for name, g in zip(params, grads, strict=True):
            counts[name] += torch.sign(-g)
    return counts


def _hand_gate(tau: dict[str, Tensor], counts: dict[str, Tensor], n: int, t: float) -> dict[str, Tensor]:
    if t > 1:
        return tau
    out = {}
    for name, value in tau.items():
        s = torch.sign(value)
        agree = (s == torch.sign(counts[name])) & (counts[name] != 0)  # t = 0: ties dropped
        below = -s * counts[name] / n < t  # 0 < t ≤ 1: opposition share below t
        out[name] = value * (agree if t == 0 else below)
    return out


def _hand_loss(
    model: nn.Module, theta: dict[str, Tensor], update: dict[str, Tensor], alpha: float, items
) -> float:
    weights = {n: theta[n] + alpha * update[n] for n in theta}
    batch = _collate(items)
    logits = functional_call(model, weights, (batch["x"],))
    return float(F.cross_entropy(logits, batch["y"], reduction="none").mean())


def test_choose_on_shots_minimises_the_held_out_loss_computed_by_hand() -> None:
    model = _MLP()
    shots = _shots(5, seed=1)
    labels = [y for _, y in shots]
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(2)
    # half a step down the full-data gradient plus noise: some candidates help, some hurt
    full = torch.autograd.grad(_loss(model, _collate(shots)).mean(), list(model.parameters()))
    tau = {
        n: -3.0 * grad + 0.3 * torch.randn(grad.shape, generator=g, dtype=torch.float64)
        for n, grad in zip(theta, full, strict=True)
    }
    thresholds, alphas = (0.0, 0.3, NAIVE), (0.0, 0.5, 1.0, 3.0)

    totals = {(t, a): 0.0 for t in thresholds for a in alphas}
    for held in shot_folds(labels, 2, seed=0):
        voters = [shots[i] for i in range(len(shots)) if i not in held]
        counts = _hand_counts(model, voters)
        for t in thresholds:
            update = _hand_gate(tau, counts, len(voters), t)
            for a in alphas:
                totals[(t, a)] += _hand_loss(model, theta, update, a, [shots[i] for i in held]) * len(held)
    hand = {candidate_key(t, a): -v / len(shots) for (t, a), v in totals.items()}
    best = min(totals, key=totals.get)  # first minimum in grid order

    choice = choose_on_shots(
        model, tau, shots, labels, _collate, _loss, thresholds, alphas, folds=2, seed=0, rule="min"
    )
    assert set(choice.scores) == set(hand)
    for key, value in hand.items():
        assert choice.scores[key] == pytest.approx(value, rel=1e-9), key
    assert (choice.threshold, choice.alpha) == best
    assert choice.score == pytest.approx(-totals[best] / len(shots), rel=1e-9)
    assert choice.source == "2-fold shots, min rule"
    assert best[1] > 0 and len({round(v, 6) for v in hand.values()}) > 3  # a real choice was made
    for name, p in model.named_parameters():  # θ_B unchanged
        assert torch.equal(p, theta[name]), name


def test_mean_loss_measures_theta_plus_alpha_update_and_restores_the_weights() -> None:
    model = _MLP()
    model.train()
    batch = _collate(_shots(3, seed=4))
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    update = {
        "body.0.weight": torch.full((6, 3), 0.1, dtype=torch.float64),
        "body.2.bias": torch.ones(2).double(),
    }
    seen_modes: list[bool] = []

    def loss_fn(m: nn.Module, b: dict[str, Tensor]) -> Tensor:
        seen_modes.append(m.training)
        return _loss(m, b)

    value = mean_loss(model, theta, update, 0.5, batch, loss_fn)
    full_update = {n: update.get(n, torch.zeros_like(t)) for n, t in theta.items()}
    expected = _hand_loss(
        model, theta, full_update, 0.5, [(x, int(y)) for x, y in zip(batch["x"], batch["y"], strict=True)]
    )
    assert value == pytest.approx(expected, rel=1e-12)
    assert seen_modes == [False] and model.training  # evaluated in eval mode, mode restored
    assert all(torch.equal(p, theta[n]) for n, p in model.named_parameters())

    def failing(m: nn.Module, b: dict[str, Tensor]) -> Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        mean_loss(model, theta, update, 2.0, batch, failing)
    assert all(torch.equal(p, theta[n]) for n, p in model.named_parameters())  # restored on an error too
    assert model.training
    with pytest.raises(ConfigError, match="lacks"):
        mean_loss(model, theta, {"nope": torch.zeros(1)}, 1.0, batch, _loss)


def test_swapped_weights_of_the_transport_job_restore_the_weights() -> None:
    from gradfix.methods.autotune import swapped_weights

    model = _MLP()
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    update = {"body.2.bias": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    with swapped_weights(model, update, 0.5):
        torch.testing.assert_close(
            model.body[2].bias.detach(), theta["body.2.bias"] + torch.tensor([0.5, -1.0]).double()
        )
        assert torch.equal(model.body[0].weight, theta["body.0.weight"])
    assert all(torch.equal(p, theta[n]) for n, p in model.named_parameters())
    with pytest.raises(RuntimeError), swapped_weights(model, update, 3.0):
        raise RuntimeError
    assert all(torch.equal(p, theta[n]) for n, p in model.named_parameters())


class _Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1, dtype=torch.float64))


def _scalar_loss(model: nn.Module, batch: Tensor) -> Tensor:
    return (model.w - batch) ** 2  # ℓ_i(α) = (α − a_i)² for θ = 0, τ = 1


@pytest.mark.parametrize(
    ("targets", "one_se", "minimum"),
    [
        # clear evidence: every shot wants α ≈ 1, so the rule keeps the loss minimiser
        ([1.0, 1.01, 0.99, 1.0, 1.02, 0.98, 1.0, 1.0], 1.0, 1.0),
        # noisy shots: α = 0.5 is best on average (mean target 0.3) but within one standard error
        # of leaving B unchanged (the spread of the targets is about 3), so the rule keeps α = 0
        ([3.3, -2.7, 3.4, -2.8, 3.2, -2.6, 3.3, -2.7], 0.0, 0.5),
    ],
)
def test_one_standard_error_rule_prefers_the_smallest_update_within_noise(targets, one_se, minimum) -> None:
    model = _Scalar()
    shots = list(targets)
    labels = [0, 1] * 4
    tau = {"w": torch.ones(1, dtype=torch.float64)}
    alphas = (0.0, 0.5, 1.0, 1.5)

    def collate(items):
        return torch.tensor(list(items), dtype=torch.float64)

    kwargs = dict(thresholds=(NAIVE,), alphas=alphas, folds=2, seed=0)
    chosen = choose_on_shots(model, tau, shots, labels, collate, _scalar_loss, rule="one-se", **kwargs)
    plain = choose_on_shots(model, tau, shots, labels, collate, _scalar_loss, rule="min", **kwargs)
    assert plain.alpha == minimum
    assert chosen.alpha == one_se
    a = torch.tensor(targets, dtype=torch.float64)
    mean = {al: float(((al - a) ** 2).mean()) for al in alphas}
    assert plain.scores[candidate_key(NAIVE, minimum)] == pytest.approx(-mean[minimum], rel=1e-12)
    if one_se != minimum:  # the kept candidate is within one standard error of the minimiser
        diff = (one_se - a) ** 2 - (minimum - a) ** 2
        assert float(diff.mean()) <= float(diff.std()) / len(targets) ** 0.5
    with pytest.raises(ConfigError, match="rule"):
        choose_on_shots(model, tau, shots, labels, collate, _scalar_loss, rule="median", **kwargs)


def test_accuracy_guard_never_chooses_a_candidate_less_accurate_than_b() -> None:
    model = _Scalar()
    shots = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 6.0, 6.0]  # the mean loss is lowest at α = 1.5
    labels = [0, 1] * 4
    tau = {"w": torch.ones(1, dtype=torch.float64)}

    def collate(items):
        return torch.tensor(list(items), dtype=torch.float64)

    def correct(m: nn.Module, batch: Tensor) -> Tensor:  # "right" within 0.3 of the target
        return ((m.w - batch).abs() < 0.3).double()

    kwargs = dict(thresholds=(NAIVE,), alphas=(0.0, 0.5, 1.5), folds=2, seed=0, rule="min")
    plain = choose_on_shots(model, tau, shots, labels, collate, _scalar_loss, **kwargs)
    guarded = choose_on_shots(model, tau, shots, labels, collate, _scalar_loss, correct=correct, **kwargs)
    assert plain.alpha == 1.5  # lowest loss, but right on none of the shots (B: 6 of 8)
    assert guarded.alpha == 0.0
