"""No mask: ``τ_A`` unchanged (naive transport ``θ_B + α · τ_A``)."""

from __future__ import annotations

from torch import Tensor

from gradfix.ops.masks.registry import Mask, ReferenceRows, SliceContext, register_mask


@register_mask
class NoMask(Mask):
    """``τ_A`` itself; needs no reference, so tensors without votes pass unchanged too."""

    name = "none"
    summary = "no mask: τ_A unchanged (naive addition)"
    equation = "τ' = τ"
    reads = "nothing"
    needs_reference = False

    def apply(self, tau: Tensor, reference: ReferenceRows, context: SliceContext) -> Tensor:
        """``τ``."""
        return tau
