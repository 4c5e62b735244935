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
    _check_same_shape(tau, reference)
    t = tau.to(torch.float32)
    r = reference.to(torch.float32)
    if scales is None:
        t, r = t / _rms(t), r / _rms(r)
    else:
        t, r = t / (scales[0] or 1.0), r / (scales[1] or 1.0)
    return torch.tanh(gamma * t * r).clamp_min(0).to(tau.dtype)


def random_sign_task_vector(tau: Tensor, generator: torch.Generator) -> Tensor:
    """Random-sign ablation: ``τ'_i = |τ_i| · s_i`` with ``s_i`` uniform in {−1, +1}."""
    bits = torch.randint(0, 2, tau.shape, generator=generator, dtype=torch.int8)
    return tau.abs() * (bits * 2 - 1).to(tau.dtype)


def vote_margin_gate(tau: Tensor, margin: Tensor, threshold: float) -> Tensor:
    """Vote-margin gate: ``m_i = 1[ −sign(τ_i) · μ_i < t ]`` with ``μ_i = v_i / n`` the vote margin.

    ``v_i = Σ_j sign(−g_i^(j))`` over ``n`` samples, so ``−sign(τ_i) μ_i`` is the net share of
    votes *against* ``τ_i``'s sign. A coordinate is dropped only when the opposition reaches the
    share ``t``: ``t = 0`` is GradFix's agreement mask (ties dropped), ``t > 1`` keeps everything
    (naive addition), values between trade the two. Returns a 0/1 tensor of ``tau``'s dtype.
    """
    _check_same_shape(tau, margin)
    opposition = -torch.sign(tau).to(torch.float32) * margin.to(torch.float32)
    return (opposition < threshold).to(tau.dtype)


def confidence_weight(tau: Tensor, margin: Tensor) -> Tensor:
    """Confidence weighting: ``w_i = (1 + sign(τ_i) · μ_i) / 2`` with ``μ_i = v_i / n``.

    The share of votes agreeing with ``τ_i``'s sign, counting a missing vote as half: 1 when every
    sample agrees, 1/2 on a tie, 0 when every sample opposes.
    """
    _check_same_shape(tau, margin)
    return ((1 + torch.sign(tau).to(torch.float32) * margin.to(torch.float32)) / 2).to(tau.dtype)


def descends(tau: Tensor, reference: Tensor) -> bool:
    """Whether ``τ`` as a whole points downhill for the real-valued reference: ``⟨r, τ⟩ > 0``.

    The inner product is summed in float64. ``r`` is the mean anti-gradient ``−ḡ`` (votes) or the
    oracle ``τ_B``; a zero inner product is not a descent.
    """
    _check_same_shape(tau, reference)
    return float(torch.sum(tau.to(torch.float64) * reference.to(torch.float64))) > 0


def tensorwise_mask(
    tau: Tensor, reference_sign: Tensor, reference: Tensor, inner: float | None = None
) -> Tensor:
    """Per-tensor choice between the whole tensor and GradFix's agreement mask.

    ``τ'_T = τ_T if ⟨−ḡ_T, τ_T⟩ > 0 else m_T ⊙ τ_T``, with ``m_T`` the agreement mask (Eq. 4)
    against ``reference_sign`` and ``−ḡ_T`` the real-valued ``reference`` (the mean anti-gradient
    of the votes, or the oracle ``τ_B``). Returns the 0/1 mask (all ones when the tensor is kept
    whole). ``inner`` gives ``⟨r, τ⟩`` of the whole tensor when ``tau`` is only a slice of it.
    """
    _check_same_shape(tau, reference)
    whole = inner > 0 if inner is not None else descends(tau, reference)
    if whole:
        return torch.ones_like(tau)
    return agreement_mask(tau, reference_sign)


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
    "gate": "drop τ_A only where the votes oppose its sign by a margin ≥ t (t=0: GradFix, t>1: naive)",
    "confidence": "weight τ_A by the share of votes agreeing with its sign",
    "tensorwise": "keep a tensor of τ_A whole where ⟨−ḡ, τ_A⟩ > 0, else apply the agreement mask to it",
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
    threshold: float = 0.3,
    scales: tuple[float, float] | None = None,
    inner: float | None = None,
) -> Tensor:
    """Return the masked task vector ``τ'`` of one tensor for the strategy ``name``.

    - ``agreement``: ``m ⊙ τ`` with ``m`` from :func:`agreement_mask`;
    - ``forcing``: ``|τ| ⊙ r``;
    - ``magnitude``: ``m ⊙ τ`` with ``m`` from :func:`magnitude_scaled_mask` on ``reference_value``
      (falls back to ``reference_sign`` when no real-valued reference is given);
    - ``random``: ``|τ| ⊙ s`` with ``s`` random signs drawn from ``generator``;
    - ``gate``: ``m ⊙ τ`` with ``m`` from :func:`vote_margin_gate` on the vote margin
      ``reference_value`` and ``threshold``;
    - ``confidence``: ``w ⊙ τ`` with ``w`` from :func:`confidence_weight` on the vote margin;
    - ``tensorwise``: ``τ`` whole if ``⟨r, τ⟩ > 0`` for the real-valued reference ``r =
      reference_value`` (``−ḡ`` or ``τ_B``), else the agreement mask (:func:`tensorwise_mask`);
      ``inner`` gives ``⟨r, τ⟩`` of the whole tensor when ``tau`` is a slice. Without
      ``reference_value`` the reference sign stands in.

    For ``gate`` and ``confidence`` ``reference_value`` is the vote margin ``v / n`` in [−1, 1]
    (without it, the reference sign stands in: a unanimous vote).
    """
    if name == "agreement":
        return agreement_mask(tau, reference_sign) * tau
    if name == "forcing":
        return sign_forcing(tau, reference_sign)
    if name == "magnitude":
        ref = reference_value if reference_value is not None else reference_sign.to(tau.dtype)
        return magnitude_scaled_mask(tau, ref, gamma, scales) * tau
    if name == "tensorwise":
        ref = reference_value if reference_value is not None else reference_sign.to(tau.dtype)
        return tensorwise_mask(tau, reference_sign, ref, inner) * tau
    if name in ("gate", "confidence"):
        margin = reference_value if reference_value is not None else reference_sign.to(torch.float32)
        if name == "gate":
            return vote_margin_gate(tau, margin, threshold) * tau
        return confidence_weight(tau, margin) * tau
    if name == "random":
        if generator is None:
            raise ValueError("the random mask needs a seeded torch.Generator")
        return random_sign_task_vector(tau, generator)
    raise ValueError(f"unknown mask {name!r}; choose one of {', '.join(MASKS)}")
