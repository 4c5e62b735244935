"""Sign estimators of the target's anti-gradient (method.md, GradFix step 1).

All functions are pure: tensors in, tensors out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_INT_TYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


def count_dtype(num_samples: int) -> torch.dtype:
    """Smallest signed integer dtype that holds a vote sum over ``num_samples`` samples.

    A vote sum lies in ``[-n, n]``, so ``n <= 127`` fits ``int8``, ``n <= 32767`` ``int16``, ...
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    for dtype in _INT_TYPES:
        if num_samples <= torch.iinfo(dtype).max:
            return dtype
    raise ValueError(f"{num_samples} samples exceed int64 vote counters")


def sign_votes(per_sample_grads: Tensor) -> Tensor:
    """Vote sum over samples: ``v_i = Σ_j sign(−g_i^(j))`` (Eq. 9, before the outer sign).

    ``per_sample_grads`` has the sample axis first, shape ``[n, *param_shape]``. A zero gradient
    casts no vote. Returns an integer tensor of shape ``param_shape`` in the smallest dtype that
    holds ``n``.
    """
    n = per_sample_grads.shape[0]
    votes = torch.sign(per_sample_grads.neg()).to(torch.int32).sum(dim=0, dtype=torch.int32)
    return votes.to(count_dtype(n))


def majority_sign(vote_sum: Tensor) -> Tensor:
    """Majority-vote sign estimate ``ŝ_i = sign(v_i)`` as int8 in {−1, 0, 1} (Eq. 9).

    A tie (``v_i = 0``) or a coordinate that never received a non-zero gradient gives 0.
    """
    return torch.sign(vote_sum).to(torch.int8)


def mean_sign(grad_sum: Tensor) -> Tensor:
    """Mean estimator ``ŝ_i = sign(−Σ_j g_i^(j))`` as int8 in {−1, 0, 1}."""
    return torch.sign(grad_sum.neg()).to(torch.int8)


def consensus_sign(signs: Sequence[Tensor]) -> Tensor:
    """Consensus of per-task sign estimates: ``ŝ_i = sign(Σ_t ŝ_i^t)`` (merge-then-mask).

    Each input is an integer sign tensor in {−1, 0, 1} of one task; the most frequent sign wins,
    a tie gives 0.
    """
    if not signs:
        raise ValueError("consensus_sign needs at least one sign tensor")
    total = torch.zeros(signs[0].shape, dtype=torch.int32)
    for s in signs:
        if s.shape != total.shape:
            raise ValueError(f"sign tensors differ in shape: {tuple(s.shape)} vs {tuple(total.shape)}")
        total += s.to(torch.int32)
    return torch.sign(total).to(torch.int8)
