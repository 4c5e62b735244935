"""Per-tensor merges of several task vectors (method.md, "Model merging").

Every function works on one tensor name at a time. The task axis is either a sequence of
same-shape tensors (one per task vector) or one stacked tensor with the tasks on dim 0. Sums are
accumulated in float32 (float64 for float64 inputs) and results come back in the inputs' dtype.
None of the functions modifies its inputs.

Conventions:

- **Trimming** keeps the ``k = ⌈density · n⌉`` largest magnitudes of ``n`` entries: the threshold
  ``t`` is the k-th largest ``|τ_i|`` and every entry with ``|τ_i| ≥ t`` is kept, so entries tied
  with the k-th one are all kept (a few more than ``k`` may survive; the result never depends on
  the order of the entries). ``density = 1`` keeps everything.
- **Elected signs** are int8 tensors in {−1, 0, 1}; a tie (zero sum) gives 0 and drops the
  coordinate from the merge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

TaskAxis = Tensor | Sequence[Tensor]

ELECT_METHODS: dict[str, str] = {
    "mass": "sign of the summed trimmed values, sign(Σ_t τ^t) (TIES-Merging paper)",
    "count": "sign of the vote count, sign(Σ_t sign(τ^t)) (GradFix reference code)",
}
"""Sign-election rules accepted by :func:`elect_sign`, with a one-line description."""


def task_arithmetic(taus: TaskAxis, weights: Sequence[float] | None = None) -> Tensor:
    """Task Arithmetic merge: ``τ = Σ_t w_t τ^t`` (``w_t = 1`` when ``weights`` is None).

    The merged vector is applied as ``θ = θ_B + α τ``; the scale ``α`` is not part of the merge.
    """
    items = _task_list(taus)
    w = _check_weights(weights, len(items))
    acc = _acc_dtype(items[0].dtype)
    total = torch.zeros(items[0].shape, dtype=acc)
    for tau, wt in zip(items, w, strict=True):
        total.add_(tau.to(acc), alpha=wt)
    return total.to(items[0].dtype)


def keep_count(numel: int, density: float) -> int:
    """Number of entries trimming keeps: ``k = ⌈density · n⌉`` (at least 1 when ``n > 0``).

    The product is rounded to 6 decimals before the ceiling, so that a product such as
    ``0.3 · 10 = 3.0000000000000004`` keeps 3 entries, not 4.
    """
    check_density(density)
    if numel <= 0:
        return 0
    return min(numel, max(1, math.ceil(round(density * numel, 6))))


def magnitude_threshold(values: TaskAxis, density: float) -> Tensor:
    """Trimming threshold ``t = the k-th largest |τ_i|`` with ``k = ⌈density · n⌉``.

    ``values`` is one tensor (per-tensor trimming) or a sequence of tensors whose entries are
    pooled (whole-model trimming: pass every tensor of one task vector). Entries with
    ``|τ_i| ≥ t`` are the ones :func:`trim` keeps. Returns a 0-dim tensor; ``+inf`` when there are
    no entries at all. Pooling concatenates the magnitudes, so it holds one copy of them in memory.
    """
    check_density(density)
    if isinstance(values, Tensor):
        flat = values.detach().abs().flatten()
    else:
        parts = [v.detach().abs().flatten() for v in values]
        if not parts:
            raise ValueError("magnitude_threshold needs at least one tensor")
        flat = parts[0] if len(parts) == 1 else torch.cat(parts)
    n = flat.numel()
    if n == 0:
        return torch.tensor(float("inf"))
    k = keep_count(n, density)
    return torch.kthvalue(flat, n - k + 1).values


def trim(tau: Tensor, density: float, threshold: Tensor | float | None = None) -> Tensor:
    """Trim one task vector: ``trim(τ)_i = τ_i · 1[|τ_i| ≥ t]``.

    Without ``threshold``, ``t = magnitude_threshold(τ, density)``, i.e. the top-``density``
    magnitudes of this tensor are kept. With ``threshold`` given (whole-model trimming, computed by
    :func:`magnitude_threshold` over all tensors of the task vector), it is used as ``t`` and
    ``density`` is only validated. ``density`` lies in (0, 1]; ``density = 1`` keeps everything.
    """
    check_density(density)
    if threshold is None:
        if density >= 1.0 or tau.numel() == 0:
            return tau.clone()
        threshold = magnitude_threshold(tau, density)
    th = torch.as_tensor(threshold)
    common = torch.promote_types(tau.dtype, th.dtype)
    return tau.masked_fill(tau.abs().to(common) < th.to(common), 0)


def elect_sign(stacked: TaskAxis, method: str = "mass") -> Tensor:
    """Elect one sign per coordinate across tasks, as int8 in {−1, 0, 1}.

    - ``"mass"``: ``γ_i = sign(Σ_t τ_i^t)`` (TIES-Merging paper);
    - ``"count"``: ``γ_i = sign(Σ_t sign(τ_i^t))`` (GradFix reference code); a zero entry (e.g.
      trimmed) casts no vote.

    A tie (the sum is exactly 0) gives ``γ_i = 0``, which drops the coordinate in
    :func:`disjoint_mean`. (The original TIES code instead fills such zeros with the sign of the
    whole vector's elected-sign sum.)
    """
    x = _stack(stacked)
    if method == "mass":
        total = x.sum(dim=0, dtype=_acc_dtype(x.dtype))
    elif method == "count":
        total = torch.sign(x).to(torch.int32).sum(dim=0, dtype=torch.int32)
    else:
        valid = ", ".join(ELECT_METHODS)
        raise ValueError(f"unknown sign election {method!r}; choose one of {valid}")
    return torch.sign(total).to(torch.int8)


def disjoint_mean(stacked: TaskAxis, sign: Tensor) -> Tensor:
    """Disjoint mean: ``τ_i = Σ_{t∈A_i} τ_i^t / |A_i|`` with ``A_i = {t : sign(τ_i^t) = γ_i ≠ 0}``.

    Only non-zero entries whose sign equals the elected sign ``γ`` are averaged; a coordinate where
    no task agrees (or where ``γ_i = 0``) gives 0.
    """
    x = _stack(stacked)
    if tuple(sign.shape) != tuple(x.shape[1:]):
        raise ValueError(f"elected sign has shape {tuple(sign.shape)}, task vectors {tuple(x.shape[1:])}")
    s = torch.sign(sign).to(torch.int8)
    agree = (torch.sign(x).to(torch.int8) == s) & (s != 0)
    acc = _acc_dtype(x.dtype)
    total = torch.where(agree, x.to(acc), torch.zeros((), dtype=acc)).sum(dim=0)
    count = agree.sum(dim=0).clamp_min(1).to(acc)
    return (total / count).to(x.dtype)


def ties_merge(
    taus: TaskAxis,
    density: float = 0.2,
    elect: str = "mass",
    thresholds: Sequence[Tensor | float | None] | None = None,
    *,
    weights: Sequence[float] | None = None,
) -> Tensor:
    """TIES-Merging of one tensor: trim, elect, disjoint mean.

    ``τ̂^t = w_t · trim(τ^t)``, ``γ = elect_sign(τ̂, elect)``,
    ``τ_i = Σ_{t: sign(τ̂_i^t) = γ_i} τ̂_i^t / |{t : sign(τ̂_i^t) = γ_i}|``.

    ``density`` is the kept fraction per task (0.2, the TIES paper's default); ``thresholds`` gives
    one precomputed whole-model threshold per task (see :func:`magnitude_threshold`), None trims
    each tensor on its own. ``weights`` (default 1) scale each trimmed task vector before the
    election. The result is the merged task vector; the scale ``α`` is applied when adding it to
    the base.
    """
    items = _task_list(taus)
    w = _check_weights(weights, len(items))
    if thresholds is None:
        thresholds = [None] * len(items)
    elif len(thresholds) != len(items):
        raise ValueError(f"got {len(thresholds)} thresholds for {len(items)} task vectors")
    trimmed = []
    for tau, th, wt in zip(items, thresholds, w, strict=True):
        t = trim(tau, density, th)
        trimmed.append(t if wt == 1.0 else t * wt)
    stacked = torch.stack(trimmed)
    return disjoint_mean(stacked, elect_sign(stacked, elect))


def check_density(density: float) -> None:
    """Raise ``ValueError`` unless ``0 < density ≤ 1``."""
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    if not (0.0 < float(density) <= 1.0):
        raise ValueError(f"density must lie in (0, 1], got {density}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _task_list(taus: TaskAxis) -> list[Tensor]:
    items = list(taus.unbind(0)) if isinstance(taus, Tensor) else list(taus)
    if not items:
        raise ValueError("need at least one task vector")
    shape = items[0].shape
    for i, t in enumerate(items):
        if t.shape != shape:
            raise ValueError(f"task vector {i} has shape {tuple(t.shape)}, task vector 0 {tuple(shape)}")
    return items


def _stack(stacked: TaskAxis) -> Tensor:
    if isinstance(stacked, Tensor):
        if stacked.dim() == 0 or stacked.shape[0] == 0:
            raise ValueError("stacked task vectors need a non-empty task axis on dim 0")
        return stacked
    return torch.stack(_task_list(stacked))


def _check_weights(weights: Sequence[float] | None, num_tasks: int) -> list[float]:
    if weights is None:
        return [1.0] * num_tasks
    w = [float(x) for x in weights]
    if len(w) != num_tasks:
        raise ValueError(f"got {len(w)} weights for {num_tasks} task vectors")
    if not all(math.isfinite(x) for x in w):
        raise ValueError(f"weights must be finite, got {w}")
    return w
