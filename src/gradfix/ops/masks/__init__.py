"""Masks that align a source task vector with a reference sign (method.md, Sec. 5.3).

The reference ``r`` is either the estimated anti-gradient sign ``ŝ`` of the target (GradFix) or
the sign of the target's own task vector ``sign(τ_B)`` (the oracle). Each strategy lives in its
own file as a pure per-tensor function with its equation and a registered :class:`Mask`
(:data:`MASKS`, by name); :func:`apply_mask` applies one to a whole tensor. None modifies its
inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

# the strategies, in the order the command line lists them (importing a file registers its mask)
from gradfix.ops.masks.agreement import agreement_mask
from gradfix.ops.masks.forcing import sign_forcing
from gradfix.ops.masks.magnitude import magnitude_scaled_mask
from gradfix.ops.masks.random import random_sign_task_vector, random_signs, seeded_generator

from gradfix.ops.masks.gate import vote_margin_gate  # isort: skip
from gradfix.ops.masks.confidence import confidence_weight  # isort: skip
from gradfix.ops.masks.tensorwise import descends, tensorwise_mask  # isort: skip
from gradfix.ops.masks.none import NoMask  # isort: skip
from gradfix.ops.masks.registry import (
    MASKS,
    Mask,
    MaskOptions,
    ReferenceRows,
    SliceContext,
    TensorStats,
    get_mask,
    register_mask,
)


def apply_mask(
    name: str,
    tau: Tensor,
    reference_sign: Tensor,
    reference_value: Tensor | None = None,
    *,
    gamma: float = 1.0,
    generator: torch.Generator | None = None,
    threshold: float = 0.3,
    scales: tuple[float, float] | None = None,
    inner: float | None = None,
) -> Tensor:
    """The masked task vector ``τ'`` of one whole tensor for the registered mask ``name``.

    ``reference_value`` is what the mask reads beside the sign: the real-valued reference
    (``−ḡ`` or ``τ_B``) for ``magnitude`` and ``tensorwise``, the vote margin ``v / n`` for
    ``gate`` and ``confidence`` (without it the sign stands in). ``random`` draws its signs from
    ``generator``. ``scales`` (``magnitude``) and ``inner`` (``tensorwise``) give the whole
    tensor's root-mean-squares and inner product when ``tau`` is only a slice of it.
    """
    mask = get_mask(name)
    if mask.reads == "margin":
        reference = ReferenceRows(reference_sign, margin=reference_value)
    else:
        reference = ReferenceRows(reference_sign, value=reference_value)
    stats = None
    if scales is not None or inner is not None:
        tau_rms, value_rms = scales if scales is not None else (0.0, 0.0)
        stats = TensorStats(1, tau_rms**2, value_rms**2, inner if inner is not None else 0.0)
        if inner is None and mask.name == "tensorwise":
            stats = None
    prepared = None
    if mask.name == "random":
        if generator is None:
            raise ValueError("the random mask needs a seeded torch.Generator")
        prepared = random_signs(tuple(tau.shape), generator)
    rows = tau.shape[0] if tau.dim() else 1
    context = SliceContext("", 0, rows, MaskOptions(gamma, threshold), stats, prepared)
    return mask.apply(tau, reference, context)


__all__ = [
    "MASKS",
    "Mask",
    "MaskOptions",
    "NoMask",
    "ReferenceRows",
    "SliceContext",
    "TensorStats",
    "agreement_mask",
    "apply_mask",
    "confidence_weight",
    "descends",
    "get_mask",
    "magnitude_scaled_mask",
    "random_sign_task_vector",
    "random_signs",
    "register_mask",
    "seeded_generator",
    "sign_forcing",
    "tensorwise_mask",
    "vote_margin_gate",
]
