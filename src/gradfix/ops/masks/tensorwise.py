"""Per tensor: ``τ_A`` whole where it points downhill as a whole, else GradFix's agreement mask."""

from __future__ import annotations

import torch
from torch import Tensor

from gradfix.ops.masks.agreement import agreement_mask
from gradfix.ops.masks.registry import Mask, ReferenceRows, SliceContext, check_same_shape, register_mask
from gradfix.ops.reductions import ordered_dot


def descends(tau: Tensor, reference: Tensor) -> bool:
    """Whether ``τ`` as a whole points downhill for the real-valued reference: ``⟨r, τ⟩ > 0``.

    The inner product is summed in float64, the same at any thread count. ``r`` is the mean
    anti-gradient ``−ḡ`` (votes) or the oracle ``τ_B``; a zero inner product is not a descent.
    """
    check_same_shape(tau, reference)
    return ordered_dot(tau, reference) > 0


def tensorwise_mask(
    tau: Tensor, reference_sign: Tensor, reference: Tensor, inner: float | None = None
) -> Tensor:
    """Per-tensor choice between the whole tensor and GradFix's agreement mask.

    ``τ'_T = τ_T if ⟨−ḡ_T, τ_T⟩ > 0 else m_T ⊙ τ_T``, with ``m_T`` the agreement mask (Eq. 4)
    against ``reference_sign`` and ``−ḡ_T`` the real-valued ``reference`` (the mean anti-gradient
    of the votes, or the oracle ``τ_B``). Returns the 0/1 mask (all ones when the tensor is kept
    whole). ``inner`` gives ``⟨r, τ⟩`` of the whole tensor when ``tau`` is only a slice of it.
    """
    check_same_shape(tau, reference)
    whole = inner > 0 if inner is not None else descends(tau, reference)
    if whole:
        return torch.ones_like(tau)
    return agreement_mask(tau, reference_sign)


@register_mask
class Tensorwise(Mask):
    """``τ_T`` whole if ``⟨r_T, τ_T⟩ > 0`` over the whole tensor, else ``m_T ⊙ τ_T``."""

    name = "tensorwise"
    summary = "keep a tensor of τ_A whole where ⟨−ḡ, τ_A⟩ > 0, else apply the agreement mask to it"
    equation = "τ'_T = τ_T if ⟨−ḡ_T, τ_T⟩ > 0 else m_T ⊙ τ_T"
    reads = "value"
    needs_stats = True

    def apply(self, tau: Tensor, reference: ReferenceRows, context: SliceContext) -> Tensor:
        """``τ`` or ``m ⊙ τ`` as the whole tensor's inner product says."""
        inner = context.stats.inner if context.stats is not None else None
        value = reference.value_or_sign(tau.dtype)
        return tensorwise_mask(tau, reference.sign, value, inner) * tau
