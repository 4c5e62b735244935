"""Confidence weighting: scale ``τ_A`` by the share of votes agreeing with its sign."""

from __future__ import annotations

import torch
from torch import Tensor

from gradfix.ops.masks.registry import Mask, ReferenceRows, SliceContext, check_same_shape, register_mask


def confidence_weight(tau: Tensor, margin: Tensor) -> Tensor:
    """Confidence weighting: ``w_i = (1 + sign(τ_i) · μ_i) / 2`` with ``μ_i = v_i / n``.

    The share of votes agreeing with ``τ_i``'s sign, counting a missing vote as half: 1 when every
    sample agrees, 1/2 on a tie, 0 when every sample opposes.
    """
    check_same_shape(tau, margin)
    return ((1 + torch.sign(tau).to(torch.float32) * margin.to(torch.float32)) / 2).to(tau.dtype)


@register_mask
class Confidence(Mask):
    """``w ⊙ τ_A`` with ``w`` the share of agreeing votes."""

    name = "confidence"
    summary = "weight τ_A by the share of votes agreeing with its sign"
    equation = "w_i = (1 + sign(τ_i) · v_i/n) / 2"
    reads = "margin"

    def apply(self, tau: Tensor, reference: ReferenceRows, context: SliceContext) -> Tensor:
        """``w ⊙ τ``."""
        return confidence_weight(tau, reference.margin_or_sign()) * tau
