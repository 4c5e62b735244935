"""Subset selection: per-class counts, seeded randomness, and known answers of each method."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from gradfix.errors import ConfigError
from gradfix.selection import SELECTIONS, select_per_class

METHODS = ("random", "herding", "kmedoids", "kcenter")


def _circle(angles: list[float], norms: list[float] | None = None) -> torch.Tensor:
    """2-D points at the given angles (radians) and lengths (1 by default)."""
    a = torch.tensor(angles, dtype=torch.float64)
    r = torch.ones_like(a) if norms is None else torch.tensor(norms, dtype=torch.float64)
    return torch.stack([r * a.cos(), r * a.sin()], dim=1)


def _pool(seed: int = 0) -> tuple[torch.Tensor, list[object]]:
    """30 examples in 3 classes of sizes 17, 2 and 11, shuffled, labels of mixed types."""
    g = torch.Generator().manual_seed(seed)
    labels: list[object] = ["b"] * 17 + ["a"] * 2 + [3] * 11
    order = torch.randperm(len(labels), generator=g).tolist()
    return torch.randn(len(labels), 5, generator=g), [labels[i] for i in order]


def test_selections_lists_the_methods() -> None:
    assert set(SELECTIONS) == set(METHODS)
    assert all(isinstance(v, str) and v for v in SELECTIONS.values())


@pytest.mark.parametrize("method", METHODS)
def test_per_class_counts_classes_sorted_unique(method: str) -> None:
    features, labels = _pool()
    k = 4
    picked = select_per_class(features, labels, k, method=method, seed=3)
    assert picked == sorted(set(picked))
    assert all(isinstance(i, int) for i in picked)
    sizes = Counter(labels)
    got = Counter(labels[i] for i in picked)
    assert got == {label: min(k, size) for label, size in sizes.items()}
    # the class smaller than k is returned whole
    assert {i for i, y in enumerate(labels) if y == "a"} <= set(picked)
    # deterministic
    assert select_per_class(features, labels, k, method=method, seed=3) == picked


@pytest.mark.parametrize("method", METHODS)
def test_k_at_least_class_size_returns_everything(method: str) -> None:
    features, labels = _pool()
    assert select_per_class(features, labels, 17, method=method) == list(range(len(labels)))


@pytest.mark.parametrize("method", ["herding", "kmedoids", "kcenter"])
def test_invariant_to_row_lengths(method: str) -> None:
    features, labels = _pool(seed=1)
    scale = torch.rand(features.shape[0], 1, generator=torch.Generator().manual_seed(9)) * 10 + 0.1
    assert select_per_class(features * scale, labels, 3, method=method, seed=2) == select_per_class(
        features, labels, 3, method=method, seed=2
    )


def test_labels_may_be_a_tensor() -> None:
    features, labels = _pool()
    codes = {"a": 0, "b": 1, 3: 2}
    as_tensor = torch.tensor([codes[y] for y in labels])
    picked = select_per_class(features, as_tensor, 4, method="kcenter")
    assert Counter(as_tensor[picked].tolist()) == {0: 2, 1: 4, 2: 4}


def test_random_is_seeded() -> None:
    features = torch.randn(60, 3, generator=torch.Generator().manual_seed(0))
    labels = [0] * 60
    a = select_per_class(features, labels, 5, method="random", seed=0)
    assert a == select_per_class(features, labels, 5, method="random", seed=0)
    assert a != select_per_class(features, labels, 5, method="random", seed=1)
    # not a fixed subset: over a few seeds the draws cover much more than k examples
    seen = set()
    for seed in range(10):
        seen.update(select_per_class(features, labels, 5, method="random", seed=seed))
    assert len(seen) > 25


def test_herding_first_pick_is_the_point_on_the_mean_direction() -> None:
    # unit directions at -0.4, 0, +0.4 rad: their mean points along 0 rad, i.e. at row 1. The raw
    # (unnormalised) rows have another nearest-to-mean row (2), so this also checks normalisation.
    x = _circle([-0.4, 0.0, 0.4], norms=[3.0, 0.5, 1.0])
    raw_nearest = int(torch.argmin(torch.linalg.vector_norm(x - x.mean(0), dim=1)))
    assert raw_nearest != 1
    assert select_per_class(x, ["c"] * 3, 1, method="herding") == [1]


def test_herding_second_pick_balances_the_first() -> None:
    # angles a = [0.3, 0.25, -0.05, -0.25, -0.3], mean ≈ -0.01: first pick -0.05 (row 2). The
    # second must bring the pair mean back to ≈ -0.01, i.e. be near 2μ - a_2 ≈ 0.03: row 1 (0.25),
    # although row 3 (-0.25) is nearer the mean than row 1 is.
    x = _circle([0.3, 0.25, -0.05, -0.25, -0.3])
    dist = torch.linalg.vector_norm(x - x.mean(0), dim=1)
    assert dist[3] < dist[1]
    assert select_per_class(x, [0] * 5, 1, method="herding") == [2]
    assert select_per_class(x, [0] * 5, 2, method="herding") == [1, 2]


def test_kcenter_on_a_line() -> None:
    # points (1, t): after normalisation their angle is atan(t), increasing with t. The mean
    # direction is nearest t = 0 (row 2); the farthest from it is t = 4 (row 5), then t = -2 (row 0).
    t = [-2.0, -1.0, 0.0, 1.0, 2.0, 4.0]
    x = torch.tensor([[1.0, v] for v in t])
    labels = ["z"] * len(t)
    assert select_per_class(x, labels, 1, method="kcenter") == [2]
    assert select_per_class(x, labels, 2, method="kcenter") == [2, 5]
    assert select_per_class(x, labels, 3, method="kcenter") == [0, 2, 5]


def _true_medoid(x: torch.Tensor, rows: list[int]) -> int:
    xn = torch.nn.functional.normalize(x[rows], dim=1)
    cost = (1 - xn @ xn.T).sum(dim=0)
    return rows[int(torch.argmin(cost))]


@pytest.mark.parametrize("seed", range(6))
def test_kmedoids_two_clusters_in_one_class(seed: int) -> None:
    # cluster A around 0 rad and cluster B around 2 rad, interleaved, with varied lengths
    angles = [-0.2, 1.8, -0.05, 1.95, 0.1, 2.1, 0.3, 2.15, 0.0, 2.5]
    norms = [1.0, 4.0, 0.2, 1.0, 2.5, 0.7, 1.0, 3.0, 6.0, 1.0]
    x = _circle(angles, norms)
    a_rows, b_rows = [0, 2, 4, 6, 8], [1, 3, 5, 7, 9]
    picked = select_per_class(x, [1] * 10, 2, method="kmedoids", seed=seed)
    assert len(picked) == 2
    assert sum(i in a_rows for i in picked) == 1
    assert sorted(picked) == sorted([_true_medoid(x, a_rows), _true_medoid(x, b_rows)])
    whole = _true_medoid(x, list(range(10)))
    assert select_per_class(x, [1] * 10, 1, method="kmedoids", seed=seed) == [whole]


def test_kmedoids_handles_duplicate_rows() -> None:
    x = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 2)
    picked = select_per_class(x, [0] * 7, 3, method="kmedoids", seed=0)
    assert len(picked) == 3 and len(set(picked)) == 3
    assert any(i >= 5 for i in picked)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "greedy"}, r"unknown selection method 'greedy'.*random.*herding.*kmedoids.*kcenter"),
        ({"k": 0}, r"k must be at least 1.*k=0"),
        ({"k": -2}, r"k must be at least 1.*k=-2"),
        ({"features": torch.zeros(4)}, r"features must be 2-D.*1-D"),
        ({"features": torch.zeros(4, 2, 1)}, r"features must be 2-D.*3-D"),
        ({"labels": [0, 1, 0]}, r"len\(labels\) = 3 does not match the 4 rows"),
    ],
)
def test_errors(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"features": torch.zeros(4, 2), "labels": [0, 1, 0, 1], "k": 1}
    args.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        select_per_class(**args)  # type: ignore[arg-type]


def test_non_finite_features_name_the_rows() -> None:
    x = torch.ones(6, 3)
    x[1, 0] = float("nan")
    x[4, 2] = float("inf")
    with pytest.raises(ConfigError, match=r"NaN or Inf in 2 of 6 rows.*1, 4"):
        select_per_class(x, [0] * 6, 2, method="herding")
