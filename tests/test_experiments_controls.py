"""The controls of what GradFix carries (experiments/controls.py), on hand-made votes."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from controls import CONTROLS, control_vectors, random_same_votes, shuffled_magnitudes, sign_step

from gradfix import SignVotes, mask_task_vector


def _inputs() -> tuple[dict[str, torch.Tensor], SignVotes]:
    g = torch.Generator().manual_seed(0)
    tau = {"a": torch.randn(40, 5, generator=g), "b": torch.randn(7, generator=g)}
    counts = {n: torch.randint(-3, 4, t.shape, generator=g).to(torch.int8) for n, t in tau.items()}
    grad_sum = {n: -c.float() for n, c in counts.items()}
    return tau, SignVotes(counts, grad_sum, 5, hits=dict.fromkeys(tau, 5))


def test_sign_step_is_the_vote_sign_times_the_mean_magnitude_of_each_tensor() -> None:
    tau, votes = _inputs()
    step = sign_step(tau, votes)
    for name, value in tau.items():
        expected = torch.sign(votes.counts[name].float()) * value.abs().mean()
        torch.testing.assert_close(step[name], expected)
        assert bool((step[name][votes.counts[name] == 0] == 0).all())  # ties: no step
    assert set(step) == set(tau)


def test_shuffled_magnitudes_keep_gradfix_coordinates_and_signs_with_tau_magnitudes() -> None:
    tau, votes = _inputs()
    gradfix = mask_task_vector(tau, votes, "agreement")
    control = shuffled_magnitudes(tau, votes, seed=3)
    moved = 0
    for name, value in tau.items():
        kept = gradfix[name] != 0
        assert torch.equal(control[name] != 0, kept), name
        assert torch.equal(torch.sign(control[name][kept]), torch.sign(value[kept]))
        # every magnitude written is one of τ_A's magnitudes in that tensor
        pool = value.abs().reshape(-1)
        assert all(bool((pool == m).any()) for m in control[name][kept].abs())
        moved += int((control[name] != gradfix[name]).sum())
    assert moved > 0  # magnitudes did move
    again = shuffled_magnitudes(tau, votes, seed=3)
    assert all(torch.equal(again[n], control[n]) for n in tau)  # seeded


def test_random_task_vector_control_masks_noise_with_the_same_votes() -> None:
    tau, votes = _inputs()
    control = random_same_votes(tau, votes, seed=1)
    signs = votes.sign()
    for name, value in tau.items():
        kept = control[name] != 0
        assert bool((torch.sign(control[name][kept]) == signs[name][kept].float()).all())
        assert not torch.equal(control[name], mask_task_vector(tau, votes, "agreement")[name])
        assert abs(float(control[name].abs().sum()) - float(value.abs().sum())) / float(value.abs().sum()) < 2
    assert list(control_vectors(tau, votes, 0)) == list(CONTROLS)
