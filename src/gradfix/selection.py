"""Subset selection: which few labelled examples per class the target model should vote on.

Sign votes cost one per-sample gradient of the target model per example, so a budget of ``k``
examples per class is often all that can be spent. This module chooses those ``k`` examples
from a larger pool, class by class, from embeddings of the pool by the target model:

- ``random``: a seeded uniform draw (the baseline);
- ``herding``: examples whose running mean tracks the class mean (kernel herding);
- ``kmedoids``: the medoids of ``k`` clusters under cosine distance;
- ``kcenter``: a greedy k-center coreset that covers the class (farthest-point traversal).

Every method except ``random`` works on L2-normalised features ``x̂ = x / ||x||`` and all of them
are deterministic for a given ``seed``; ties go to the lowest index within the class.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch
from torch import Tensor

from gradfix.errors import ConfigError

__all__ = ["SELECTIONS", "select_per_class"]

SELECTIONS: dict[str, str] = {
    "random": "uniform draw without replacement, seeded",
    "herding": "kernel herding: greedy picks whose running mean tracks the class mean",
    "kmedoids": "k-medoids (Voronoi iteration, k-means++ init) on cosine distance; returns the medoids",
    "kcenter": "greedy k-center coreset (farthest-point traversal) from the point nearest the class mean",
}

_KMEDOIDS_MAX_ITER = 100


def select_per_class(
    features: Tensor,
    labels: Sequence[Hashable],
    k: int,
    method: str = "random",
    seed: int = 0,
) -> list[int]:
    """Choose ``min(k, n_c)`` examples of each class ``c`` of the pool, by ``method``.

    ``features`` is ``[N, D]`` (embeddings of the pool by the target model) and ``labels`` has
    ``N`` entries. Classes are visited in the sorted order of ``str(label)``; each method runs
    within one class at a time on that class's rows only. One seeded generator is shared by
    the classes in that order, so the result depends only on the inputs and ``seed``.

    Returns the chosen indices into the pool, sorted ascending and without duplicates.
    """
    if method not in SELECTIONS:
        raise ConfigError(f"unknown selection method {method!r}; known methods: {', '.join(SELECTIONS)}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise ConfigError(f"k must be an integer, got {type(k).__name__} {k!r}")
    if k < 1:
        raise ConfigError(f"k must be at least 1 example per class, got k={k}")
    if not isinstance(features, Tensor):
        raise ConfigError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 2:
        raise ConfigError(
            f"features must be 2-D [N, D], got {features.dim()}-D tensor of shape {tuple(features.shape)}"
        )
    if isinstance(labels, Tensor):
        labels = labels.reshape(-1).tolist()
    n = features.shape[0]
    if len(labels) != n:
        raise ConfigError(f"len(labels) = {len(labels)} does not match the {n} rows of features")
    x = features.detach().to(device="cpu", dtype=torch.float64)
    bad = ~torch.isfinite(x).all(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        shown = ", ".join(str(r) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
        raise ConfigError(f"features hold NaN or Inf in {len(rows)} of {n} rows; first rows: {shown}")

    groups: dict[Hashable, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)

    pick: Callable[[Tensor, int, torch.Generator], list[int]] = _METHODS[method]
    generator = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for label in sorted(groups, key=str):
        members = groups[label]
        if len(members) <= k:
            chosen.extend(members)
            continue
        local = pick(x[members], k, generator)
        chosen.extend(members[j] for j in local)
    return sorted(chosen)


def _normalise(x: Tensor) -> Tensor:
    """``x̂_i = x_i / max(||x_i||, ε)``; an all-zero row stays zero."""
    return torch.nn.functional.normalize(x, p=2.0, dim=1, eps=1e-12)


def _random(x: Tensor, k: int, generator: torch.Generator) -> list[int]:
    """Uniform sample of ``k`` of the ``n`` rows without replacement: the first ``k`` of a seeded
    random permutation, so every ``k``-subset has probability ``1 / C(n, k)``."""
    return torch.randperm(x.shape[0], generator=generator)[:k].tolist()


def _herding(x: Tensor, k: int, generator: torch.Generator) -> list[int]:
    """Kernel herding (Welling, 2009) on normalised features ``x̂``.

    With ``μ = (1/n) Σ_i x̂_i`` and ``S_m`` the sum of the ``m`` rows picked so far, step ``m+1``
    picks, among the rows not yet picked,

        ``i* = argmin_i || μ − (S_m + x̂_i) / (m + 1) ||₂``,

    so the mean of the picked set tracks the class mean as closely as possible at every size.
    """
    del generator  # deterministic
    xn = _normalise(x)
    mu = xn.mean(dim=0)
    total = torch.zeros_like(mu)
    taken = torch.zeros(xn.shape[0], dtype=torch.bool)
    picked: list[int] = []
    for m in range(k):
        gap = torch.linalg.vector_norm(mu - (total + xn) / (m + 1), dim=1)
        gap[taken] = torch.inf
        i = int(torch.argmin(gap))
        picked.append(i)
        taken[i] = True
        total = total + xn[i]
    return picked


def _kcenter(x: Tensor, k: int, generator: torch.Generator) -> list[int]:
    """Greedy k-center coreset (farthest-point traversal, Gonzalez 1985) on normalised features.

    Starts from ``c_1 = argmin_i ||x̂_i − μ||₂`` with ``μ`` the class mean of ``x̂``, then adds

        ``c_{m+1} = argmax_i min_{j ≤ m} ||x̂_i − x̂_{c_j}||₂``,

    the row farthest from its nearest chosen centre. This is a 2-approximation of the k-center
    objective ``min_C max_i min_{c ∈ C} ||x̂_i − x̂_c||₂``.
    """
    del generator  # deterministic
    xn = _normalise(x)
    mu = xn.mean(dim=0)
    first = int(torch.argmin(torch.linalg.vector_norm(xn - mu, dim=1)))
    picked = [first]
    nearest = torch.linalg.vector_norm(xn - xn[first], dim=1)
    taken = torch.zeros(xn.shape[0], dtype=torch.bool)
    taken[first] = True
    while len(picked) < k:
        gap = nearest.masked_fill(taken, -torch.inf)
        i = int(torch.argmax(gap))
        picked.append(i)
        taken[i] = True
        nearest = torch.minimum(nearest, torch.linalg.vector_norm(xn - xn[i], dim=1))
    return picked


def _kmedoids(x: Tensor, k: int, generator: torch.Generator) -> list[int]:
    """k-medoids on cosine distance ``d(i, j) = 1 − x̂_i · x̂_j`` of the normalised features.

    Minimises ``Σ_i min_{c ∈ C} d(i, c)`` over sets ``C`` of ``k`` rows (the medoids) by Voronoi
    iteration: assign every row to its nearest medoid, then replace each cluster's medoid by

        ``c ← argmin_{j ∈ cluster} Σ_{i ∈ cluster} d(i, j)``,

    until the medoids stop changing or after ``_KMEDOIDS_MAX_ITER`` rounds. The cost never
    increases. Initialisation is k-means++ (Arthur & Vassilvitskii, 2007) with the seeded
    generator: the first medoid uniformly, each next one with probability ``∝ min_{c} d(i, c)²``.
    """
    xn = _normalise(x)
    n = xn.shape[0]
    dist = (1.0 - xn @ xn.T).clamp_min(0.0)
    dist.fill_diagonal_(0.0)

    medoids = [int(torch.randint(n, (1,), generator=generator))]
    nearest = dist[medoids[0]].clone()
    while len(medoids) < k:
        weight = nearest.square()
        weight[medoids] = 0.0
        if float(weight.sum()) <= 0.0:  # every remaining row duplicates a medoid
            weight = torch.ones(n, dtype=dist.dtype)
            weight[medoids] = 0.0
        i = int(torch.multinomial(weight, 1, generator=generator))
        medoids.append(i)
        nearest = torch.minimum(nearest, dist[i])

    for _ in range(_KMEDOIDS_MAX_ITER):
        centres = torch.tensor(medoids)
        assign = torch.argmin(dist[:, centres], dim=1)
        assign[centres] = torch.arange(k)  # a medoid always belongs to its own cluster
        updated = []
        for c in range(k):
            members = (assign == c).nonzero().flatten()
            cost = dist[members][:, members].sum(dim=0)
            best = int(torch.argmin(cost))
            current = int((members == medoids[c]).nonzero())
            # keep the current medoid on a tie, so equal-cost swaps cannot cycle
            updated.append(medoids[c] if cost[current] <= cost[best] else int(members[best]))
        if updated == medoids:
            break
        medoids = updated
    return medoids


_METHODS: dict[str, Callable[[Tensor, int, torch.Generator], list[int]]] = {
    "random": _random,
    "herding": _herding,
    "kmedoids": _kmedoids,
    "kcenter": _kcenter,
}
