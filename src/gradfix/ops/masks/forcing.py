"""Sign forcing (Eq. 11): give ``|τ_A|`` the reference's sign."""

from __future__ import annotations

from torch import Tensor

from gradfix.ops.masks.registry import Mask, ReferenceRows, SliceContext, check_same_shape, register_mask


def sign_forcing(tau: Tensor, reference_sign: Tensor) -> Tensor:
    """Sign forcing (Eq. 11): ``τ'_i = |τ_i| · r_i``; disagreeing entries are flipped, not dropped."""
    check_same_shape(tau, reference_sign)
    return tau.abs() * reference_sign.to(tau.dtype)


@register_mask
class Forcing(Mask):
    """``|τ_A| ⊙ r``."""

    name = "forcing"
    summary = "give |τ_A| the reference sign (Eq. 11)"
    equation = "τ'_i = |τ_i| · r_i"
    reads = "sign"

    def apply(self, tau: Tensor, reference: ReferenceRows, context: SliceContext) -> Tensor:
        """``|τ| ⊙ r``."""
        return sign_forcing(tau, reference.sign)
