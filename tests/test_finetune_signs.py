"""Signs from the target's own few-shot fine-tune (gradfix.votes.finetune) and their use per fold."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from gradfix.errors import ConfigError
from gradfix.methods.autotune import score_on_shots
from gradfix.votes import SignVotes, estimate_signs, finetune_signs


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.2), nn.Linear(6, 3))


def _batch(n: int = 12, seed: int = 1) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 4, generator=g), "labels": torch.arange(n) % 3}


def _loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return nn.functional.cross_entropy(model(batch["x"]), batch["labels"], reduction="none")


def test_the_signs_are_those_of_adamw_steps_taken_by_hand_and_the_model_is_restored() -> None:
    model, batch = _model(), _batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.eval()
    rng = torch.get_rng_state()
    votes = finetune_signs(model, [batch], _loss, steps=5, lr=1e-2, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)  # the global random state is untouched
    assert not model.training and all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    copy = _model()
    optimizer = torch.optim.AdamW(copy.parameters(), lr=1e-2, weight_decay=0.0)
    torch.manual_seed(3)
    copy.train()
    for _ in range(5):
        optimizer.zero_grad()
        _loss(copy, batch).mean().backward()
        optimizer.step()
    for name, param in copy.named_parameters():
        assert torch.equal(votes.sign()[name], torch.sign(param.detach() - before[name]).to(torch.int8)), name
    assert votes.num_samples == 12 and votes.estimator == "mean"


def test_one_step_points_where_the_mean_gradient_descends() -> None:
    model, batch = _model(), _batch()
    model[2].p = 0.0  # no dropout: the step's gradient is the mean estimator's
    one = finetune_signs(model, [batch], _loss, steps=1, lr=1e-3).sign()
    mean = estimate_signs(model, [batch], _loss, "mean", progress=False).sign()
    for name, signs in mean.items():
        voted = signs != 0
        assert torch.equal(one[name][voted], signs[voted]), name


def test_batches_are_pooled_into_one_mean_and_frozen_parameters_are_left_out() -> None:
    model, batch = _model(), _batch()
    model[0].weight.requires_grad_(False)
    halves = [{k: v[:5] for k, v in batch.items()}, {k: v[5:] for k, v in batch.items()}]
    whole = finetune_signs(model, [batch], _loss, steps=3, lr=1e-2)
    split = finetune_signs(model, halves, _loss, steps=3, lr=1e-2)
    assert "0.weight" not in whole.names() and split.num_samples == 12
    for name in whole.names():
        assert torch.equal(whole.sign()[name], split.sign()[name]), name


@pytest.mark.parametrize(("steps", "lr"), [(0, 1e-3), (3, 0.0)])
def test_a_fine_tune_that_cannot_move_is_refused(steps: int, lr: float) -> None:
    with pytest.raises(ConfigError, match="steps"):
        finetune_signs(_model(), [_batch()], _loss, steps=steps, lr=lr)


def test_score_on_shots_takes_each_folds_signs_from_the_given_estimator() -> None:
    model, batch = _model(), _batch()
    tau = {n: torch.randn_like(p) * 0.1 for n, p in model.named_parameters()}
    shots = list(range(12))
    labels = [int(y) for y in batch["labels"]]

    def collate(indices: list[int]) -> dict[str, Tensor]:
        return {k: v[indices] for k, v in batch.items()}

    seen: list[int] = []

    def fixed(model: nn.Module, voters: dict[str, Tensor]) -> SignVotes:
        n = len(voters["labels"])
        seen.append(n)
        return SignVotes({}, {name: -t for name, t in tau.items()}, n, "mean", dict.fromkeys(tau, n))

    scores = score_on_shots(model, tau, shots, labels, collate, _loss, [0.0], [0.0, 1.0], fold_signs=fixed)
    assert seen == [6, 6]  # one estimate per fold, on the other fold's shots
    # signs equal to τ's own: the agreement mask keeps τ whole, so t = 0 scores as naive addition
    naive = score_on_shots(model, tau, shots, labels, collate, _loss, [2.0], [0.0, 1.0])
    for got, want in zip(scores.losses[(0.0, 1.0)], naive.losses[(2.0, 1.0)], strict=True):
        assert torch.allclose(got, want)


def test_runs_sum_the_displacements_of_fine_tunes_with_their_own_dropout_seeds() -> None:
    model, batch = _model(), _batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    first = finetune_signs(model, [batch], _loss, steps=4, lr=1e-2, seed=3)
    second = finetune_signs(model, [batch], _loss, steps=4, lr=1e-2, seed=1003)
    both = finetune_signs(model, [batch], _loss, steps=4, lr=1e-2, seed=3, runs=2)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not torch.equal(first.grad_sum["0.weight"], second.grad_sum["0.weight"])  # dropout differs
    for name in before:
        torch.testing.assert_close(both.grad_sum[name], first.grad_sum[name] + second.grad_sum[name])
    with pytest.raises(ConfigError, match="runs ≥ 1"):
        finetune_signs(model, [batch], _loss, runs=0)


def test_the_last_step_leaves_no_gradient_behind() -> None:
    model, batch = _model(), _batch()
    finetune_signs(model, [batch], _loss, steps=2, lr=1e-2)
    assert all(p.grad is None for p in model.parameters())
    marker = torch.ones_like(model[0].weight)
    model[0].weight.grad = marker  # a gradient the caller holds is given back as it was
    finetune_signs(model, [batch], _loss, steps=2, lr=1e-2)
    assert model[0].weight.grad is marker and model[3].weight.grad is None
