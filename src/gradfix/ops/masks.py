"""Masks that align a source task vector with a reference sign (method.md, Sec. 5.3).

The reference ``r`` is either the estimated anti-gradient sign ``ŝ`` of the target (GradFix) or
the sign of the target's own task vector ``sign(τ_B)`` (the oracle). Every function works on one
tensor and returns a new tensor; none modifies its inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor


def agreement_mask(tau: Tensor, reference_sign: Tensor) -> Tensor:
    """Sign-agreement mask (Eq. 4): ``m_i = 1[sign(τ_i) = r_i]``, with ``m_i = 0`` where ``r_i = 0``.

    Returns a 0/1 tensor of ``tau``'s dtype. A tie or an untouched coordinate of the reference
    (``r_i = 0``) drops the coordinate.
    """
    _check_same_shape(tau, reference_sign)
    ref = reference_sign.to(torch.int8)
    keep = (torch.sign(tau).to(torch.int8) == ref) & (ref != 0)
    return keep.to(tau.dtype)


def sign_forcing(tau: Tensor, reference_sign: Tensor) -> Tensor:
    """Sign forcing (Eq. 11): ``τ'_i = |τ_i| · r_i``; disagreeing entries are flipped, not dropped."""
    _check_same_shape(tau, reference_sign)
    return tau.abs() * reference_sign.to(tau.dtype)


def magnitude_scaled_mask(tau: Tensor, reference: Tensor, gamma: float = 1.0) -> Tensor:
    """Magnitude-scaled soft mask (Eq. 12): ``m_i = max(0, tanh(γ · τ̃_i · r̃_i))``.

    ``τ̃ = τ / rms(τ)`` and ``r̃ = r / rms(r)`` are the task vector and the real-valued reference
    (the oracle ``τ_B``, or the mean anti-gradient ``−ḡ``) scaled to unit root-mean-square per
    tensor, so that ``γ`` does not depend on the scale of either. The mask is near 1 where the
    signs agree and both magnitudes are large, small where either is small, 0 on disagreement.
    """
    _check_same_shape(tau, reference)
    t = tau.to(torch.float32)
    r = reference.to(torch.float32)
    t = t / _rms(t)
    r = r / _rms(r)
    return torch.tanh(gamma * t * r).clamp_min(0).to(tau.dtype)


def random_sign_task_vector(tau: Tensor, generator: torch.Generator) -> Tensor:
    """Random-sign ablation: ``τ'_i = |τ_i| · s_i`` with ``s_i`` uniform in {−1, +1}."""
    bits = torch.randint(0, 2, tau.shape, generator=generator, dtype=torch.int8)
    return tau.abs() * (bits * 2 - 1).to(tau.dtype)


def _rms(x: Tensor) -> Tensor:
    value = x.pow(2).mean().sqrt()
    return value if value > 0 else torch.ones((), dtype=x.dtype)


def _check_same_shape(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: task vector {tuple(a.shape)} vs reference {tuple(b.shape)}")


MASKS: dict[str, str] = {
    "agreement": "keep τ_A where its sign agrees with the reference (GradFix, Eq. 4)",
    "forcing": "give |τ_A| the reference sign (Eq. 11)",
    "magnitude": "soft mask max(0, tanh(γ·τ̃·r̃)) from a real-valued reference (Eq. 12)",
    "random": "|τ_A| with uniformly random signs (ablation)",
}
"""Names of the mask strategies accepted by :func:`apply_mask`, with a one-line description."""


def apply_mask(
    name: str,
    tau: Tensor,
    reference_sign: Tensor,
    reference_value: Tensor | None = None,
    *,
    gamma: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Return the masked task vector ``τ'`` of one tensor for the strategy ``name``.

    - ``agreement``: ``m ⊙ τ`` with ``m`` from :func:`agreement_mask`;
    - ``forcing``: ``|τ| ⊙ r``;
    - ``magnitude``: ``m ⊙ τ`` with ``m`` from :func:`magnitude_scaled_mask` on ``reference_value``
      (falls back to ``reference_sign`` when no real-valued reference is given);
    - ``random``: ``|τ| ⊙ s`` with ``s`` random signs drawn from ``generator``.
    """
    if name == "agreement":
        return agreement_mask(tau, reference_sign) * tau
    if name == "forcing":
        return sign_forcing(tau, reference_sign)
    if name == "magnitude":
        ref = reference_value if reference_value is not None else reference_sign.to(tau.dtype)
        return magnitude_scaled_mask(tau, ref, gamma) * tau
    if name == "random":
        if generator is None:
            raise ValueError("the random mask needs a seeded torch.Generator")
        return random_sign_task_vector(tau, generator)
    raise ValueError(f"unknown mask {name!r}; choose one of {', '.join(MASKS)}")
