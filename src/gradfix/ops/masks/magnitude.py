"""The magnitude-scaled soft mask (Eq. 12) from a real-valued reference."""

from __future__ import annotations

import torch
from torch import Tensor

from gradfix.ops.masks.registry import (
    Mask,
    ReferenceRows,
    SliceContext,
    check_same_shape,
    register_mask,
    rms,
)


def magnitude_scaled_mask(
    tau: Tensor, reference: Tensor, gamma: float = 1.0, scales: tuple[float, float] | None = None
) -> Tensor:
    """Magnitude-scaled soft mask (Eq. 12): ``m_i = max(0, tanh(γ · τ̃_i · r̃_i))``.

    ``τ̃ = τ / rms(τ)`` and ``r̃ = r / rms(r)`` are the task vector and the real-valued reference
    (the oracle ``τ_B``, or the mean anti-gradient ``−ḡ``) scaled to unit root-mean-square per
    tensor, so that ``γ`` does not depend on the scale of either. The mask is near 1 where the
    signs agree and both magnitudes are large, small where either is small, 0 on disagreement.
    ``scales`` gives ``(rms(τ), rms(r))`` of the whole tensor when ``tau`` is only a slice of it.
    """
    check_same_shape(tau, reference)
    t = tau.to(torch.float32)
    r = reference.to(torch.float32)
    if scales is None:
        t, r = t / rms(t), r / rms(r)
    else:
        t, r = t / (scales[0] or 1.0), r / (scales[1] or 1.0)
    return torch.tanh(gamma * t * r).clamp_min(0).to(tau.dtype)


@register_mask
class Magnitude(Mask):
    """``m ⊙ τ_A`` with the soft mask of Eq. 12, scaled by the whole tensor's root-mean-squares."""

    name = "magnitude"
    summary = "soft mask max(0, tanh(γ·τ̃·r̃)) from a real-valued reference (Eq. 12)"
    equation = "m_i = max(0, tanh(γ · τ_i/rms(τ) · r_i/rms(r)))"
    reads = "value"
    needs_stats = True

    def apply(self, tau: Tensor, reference: ReferenceRows, context: SliceContext) -> Tensor:
        """``m ⊙ τ`` (the reference sign stands in for a reference without values)."""
        scales = context.stats.scales if context.stats is not None else None
        value = reference.value_or_sign(tau.dtype)
        return magnitude_scaled_mask(tau, value, context.options.gamma, scales) * tau
