"""Rank-``r`` factors of a matrix by truncated SVD, and the share of its energy they keep.

For ``M`` of shape ``(m, n)`` with singular value decomposition ``M = U S Vᵀ``,

    M ≈ B @ A,   B = U_r · sqrt(S_r)  (m × r),   A = sqrt(S_r) · V_rᵀ  (r × n),

the best rank-``r`` approximation in the Frobenius norm (Eckart–Young). ``B @ A = P M`` with
``P = U_r U_rᵀ`` an orthogonal projection, so ``‖M‖² = ‖B A‖² + ‖M − B A‖²`` and

    kept share = ‖B A‖²_F / ‖M‖²_F = Σ_{i<r} σ_i² / Σ_i σ_i²

is the share of ``M``'s energy (squared Frobenius norm) the factors keep; ``1 − share`` is the
relative squared error. Large matrices with a small rank use a seeded randomized SVD
(``torch.svd_lowrank``), which is again a projection of ``M``, so the same identity holds for
the factors it returns (they are then close to, not exactly, the best ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

EXACT_LIMIT = 2048
"""Matrices whose smaller side is at most this get the exact SVD whatever the rank."""
OVERSAMPLE = 10
"""Extra columns of the randomized SVD's sketch, beyond the rank."""


@dataclass(frozen=True)
class LowRank:
    """Factors ``b`` (m × r) and ``a`` (r × n) with ``M ≈ b @ a``, and the energies they account for."""

    b: Tensor
    a: Tensor
    energy: float
    """``‖M‖²_F``, the energy of the factored matrix."""
    kept: float
    """``‖b @ a‖²_F``, the energy the factors keep."""

    @property
    def share(self) -> float:
        """``kept / energy`` in ``[0, 1]`` (1 for an all-zero matrix, which loses nothing)."""
        if self.energy <= 0:
            return 1.0
        return min(1.0, max(0.0, self.kept / self.energy))


def max_rank(shape: tuple[int, ...]) -> int:
    """The largest rank a matrix of ``shape`` has: ``min(m, n)``."""
    return min(shape) if len(shape) == 2 else 0


def truncated_svd(matrix: Tensor, rank: int, *, exact_limit: int = EXACT_LIMIT, seed: int = 0) -> LowRank:
    """The rank-``rank`` factors ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_rᵀ`` of a 2-d ``matrix``.

    Computed in float32 on the matrix's device. The exact SVD is used when the smaller side is at
    most ``exact_limit`` or ``rank`` is more than a quarter of it; otherwise a randomized SVD
    (four power iterations, :data:`OVERSAMPLE` extra columns) seeded with ``seed``, so the
    factors are the same on every run. ``rank`` must be between 1 and ``min(m, n)``.
    """
    if matrix.dim() != 2:
        raise ValueError(f"truncated_svd needs a 2-d matrix, got shape {list(matrix.shape)}")
    limit = max_rank(tuple(matrix.shape))
    if not 1 <= rank <= limit:
        raise ValueError(f"rank {rank} is not in 1..{limit} for a matrix of shape {list(matrix.shape)}")
    m = matrix.detach().to(torch.float32)
    energy = float(torch.linalg.vector_norm(m, dtype=torch.float64) ** 2)
    if limit <= exact_limit or 4 * rank > limit:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        with torch.random.fork_rng(devices=[m.device] if m.is_cuda else []):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(m, q=min(rank + OVERSAMPLE, limit), niter=4)
        u, s, vh = u[:, :rank], s[:rank], v[:, :rank].T
    root = s.sqrt()
    kept = float((s.to(torch.float64) ** 2).sum())
    return LowRank(b=(u * root).contiguous(), a=(root[:, None] * vh).contiguous(), energy=energy, kept=kept)


__all__ = ["EXACT_LIMIT", "OVERSAMPLE", "LowRank", "max_rank", "truncated_svd"]
