"""Controls for what GradFix's update carries: τ_A's knowledge, or B's own descent signs on the shots.

GradFix writes ``m ⊙ τ_A`` with ``m = [sign(τ_A) = ŝ]`` (``ŝ`` the sign of B's votes on the
shots). Each control keeps part of that and replaces the rest:

- ``random task vector, same votes``: the same votes mask a random vector with τ_A's per-tensor
  mean and standard deviation (τ_A's values gone, B's votes kept);
- ``sign step``: ``ŝ · mean|τ_A|`` (per tensor) on every voted coordinate (a plain sign-gradient
  step of B on the shots, scaled like τ_A);
- ``shuffled |τ_A|, GradFix signs``: GradFix's kept coordinates and signs, with magnitudes drawn
  by shuffling τ_A's ``|values|`` within each tensor (τ_A's signs kept, its magnitudes' placement
  gone).

If GradFix is no better than these, its gain is B's own gradient step, not A's knowledge.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from gradfix import SignVotes, TaskVector, mask_task_vector, random_task_vector

CONTROLS = ("random task vector, same votes", "sign step", "shuffled |τ_A|, GradFix signs")
"""Row names of the controls (Table 1 prefixes them with ``control: ``)."""


def sign_step(tau: Mapping[str, Tensor], votes: SignVotes) -> TaskVector:
    """``ŝ · mean|τ_A|`` per tensor on every voted coordinate (zero where the vote ties or is absent)."""
    signs = votes.sign()
    out = {}
    for name, value in tau.items():
        scale = value.abs().double().mean().to(value.dtype)
        step = signs[name].to(value.dtype) * scale if name in signs else torch.zeros_like(value)
        out[name] = step
    return TaskVector(out)


def shuffled_magnitudes(tau: Mapping[str, Tensor], votes: SignVotes, seed: int) -> TaskVector:
    """GradFix's mask and signs with ``|τ_A|`` shuffled within each tensor (seeded per tensor order)."""
    gen = torch.Generator().manual_seed(seed)
    shuffled = {}
    for name, value in tau.items():
        flat = value.abs().reshape(-1)
        order = torch.randperm(flat.numel(), generator=gen)
        shuffled[name] = torch.sign(value) * flat[order].reshape(value.shape)
    # sign(shuffled) = sign(τ_A) wherever the drawn magnitude is not zero: the same kept coordinates
    return mask_task_vector(shuffled, votes, "agreement", unvoted="drop")


def random_same_votes(tau: Mapping[str, Tensor], votes: SignVotes, seed: int) -> TaskVector:
    """The agreement mask of the same votes applied to a random vector with τ_A's per-tensor μ, σ."""
    return mask_task_vector(random_task_vector(tau, seed), votes, "agreement", unvoted="drop")


def control_vectors(tau: Mapping[str, Tensor], votes: SignVotes, seed: int) -> dict[str, TaskVector]:
    """The three controls of one vote, by row name (:data:`CONTROLS`)."""
    return {
        CONTROLS[0]: random_same_votes(tau, votes, seed),
        CONTROLS[1]: sign_step(tau, votes),
        CONTROLS[2]: shuffled_magnitudes(tau, votes, seed),
    }
