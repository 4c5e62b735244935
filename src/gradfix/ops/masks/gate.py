"""The vote-margin gate: drop ``τ_A`` only where the votes oppose its sign by a margin ≥ ``t``."""

from __future__ import annotations

import torch
from torch import Tensor

from gradfix.ops.masks.registry import Mask, ReferenceRows, SliceContext, check_same_shape, register_mask


def vote_margin_gate(tau: Tensor, margin: Tensor, threshold: float) -> Tensor:
    """Vote-margin gate: ``m_i = 1[ −sign(τ_i) · μ_i < t ]`` with ``μ_i = v_i / n`` the vote margin.

    ``v_i = Σ_j sign(−g_i^(j))`` over ``n`` samples, so ``−sign(τ_i) μ_i`` is the net share of
    votes *against* ``τ_i``'s sign. A coordinate is dropped only when the opposition reaches the
    share ``t``: ``t = 0`` is GradFix's agreement mask (ties dropped), ``t > 1`` keeps everything
    (naive addition), values between trade the two. Returns a 0/1 tensor of ``tau``'s dtype.
    """
    check_same_shape(tau, margin)
    opposition = -torch.sign(tau).to(torch.float32) * margin.to(torch.float32)
    return (opposition < threshold).to(tau.dtype)


@register_mask
class Gate(Mask):
    """``m_t ⊙ τ_A`` with the vote-margin gate at ``options.threshold``."""

    name = "gate"
    summary = "drop τ_A only where the votes oppose its sign by a margin ≥ t (t=0: GradFix, t>1: naive)"
    equation = "m_i = 1[−sign(τ_i) · v_i/n < t]"
    reads = "margin"

    def apply(self, tau: Tensor, reference: ReferenceRows, context: SliceContext) -> Tensor:
        """``m_t ⊙ τ``."""
        return vote_margin_gate(tau, reference.margin_or_sign(), context.options.threshold) * tau
