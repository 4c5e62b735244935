"""GradFix's sign-agreement mask (Eq. 4): keep ``τ_A`` where its sign agrees with the reference."""

from __future__ import annotations

import torch
from torch import Tensor

from gradfix.ops.masks.registry import Mask, ReferenceRows, SliceContext, check_same_shape, register_mask


def agreement_mask(tau: Tensor, reference_sign: Tensor) -> Tensor:
    """Sign-agreement mask (Eq. 4): ``m_i = 1[sign(τ_i) = r_i]``, with ``m_i = 0`` where ``r_i = 0``.

    Returns a 0/1 tensor of ``tau``'s dtype. A tie or an untouched coordinate of the reference
    (``r_i = 0``) drops the coordinate.
    """
    check_same_shape(tau, reference_sign)
    ref = reference_sign.to(torch.int8)
    keep = (torch.sign(tau).to(torch.int8) == ref) & (ref != 0)
    return keep.to(tau.dtype)


@register_mask
class Agreement(Mask):
    """``m ⊙ τ_A`` with ``m`` the agreement mask."""

    name = "agreement"
    summary = "keep τ_A where its sign agrees with the reference (GradFix, Eq. 4)"
    equation = "m_i = 1[sign(τ_i) = r_i], r_i ≠ 0"
    reads = "sign"

    def apply(self, tau: Tensor, reference: ReferenceRows, context: SliceContext) -> Tensor:
        """``m ⊙ τ``."""
        return agreement_mask(tau, reference.sign) * tau
