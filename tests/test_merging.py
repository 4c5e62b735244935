"""Merging: per-tensor TIES / Task Arithmetic and the GradFix mask/merge pipelines."""

from __future__ import annotations

import pytest
import torch

from gradfix.errors import ConfigError, GradfixError, MismatchError
from gradfix.merge import (
    MERGE_METHODS,
    consensus_signs,
    mask_then_merge,
    merge_task_vectors,
    merge_then_mask,
    multi_source_merge,
)
from gradfix.ops.merging import (
    disjoint_mean,
    elect_sign,
    keep_count,
    magnitude_threshold,
    task_arithmetic,
    ties_merge,
    trim,
)
from gradfix.task_vector import TaskVector


def T(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def S(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int8)


# Three task vectors of 5 entries; density 0.6 keeps k = ceil(0.6 * 5) = 3 entries of each.
TAU1 = T(1.0, 0.5, 2.0, 3.0, -0.1)  # |.| ranks 3 > 2 > 1 > 0.5 > 0.1  -> keep c3, c2, c0
TAU2 = T(1.0, -3.0, -2.0, -0.8, 0.4)  # 3 > 2 > 1 > 0.8 > 0.4          -> keep c1, c2, c0
TAU3 = T(-4.0, 2.0, -0.5, 5.0, 0.2)  # 5 > 4 > 2 > 0.5 > 0.2          -> keep c3, c0, c1


# -- ops: trimming ------------------------------------------------------------------------------
def test_trim_hand_computed():
    assert torch.equal(trim(TAU1, 0.6), T(1.0, 0.0, 2.0, 3.0, 0.0))
    assert torch.equal(trim(TAU2, 0.6), T(1.0, -3.0, -2.0, 0.0, 0.0))
    assert torch.equal(trim(TAU3, 0.6), T(-4.0, 2.0, 0.0, 5.0, 0.0))


def test_trim_density_one_keeps_everything_and_ties_are_kept():
    assert torch.equal(trim(TAU1, 1.0), TAU1)
    # k = ceil(0.25 * 4) = 1; the threshold is 2 and both entries of magnitude 2 are kept
    assert torch.equal(trim(T(2.0, -2.0, 1.0, 0.5), 0.25), T(2.0, -2.0, 0.0, 0.0))
    # an explicit threshold overrides the per-tensor one: keep |x| >= 1
    assert torch.equal(trim(T(2.0, -2.0, 1.0, 0.5), 0.25, torch.tensor(1.0)), T(2.0, -2.0, 1.0, 0.0))


def test_keep_count_and_threshold():
    assert keep_count(5, 0.6) == 3
    assert keep_count(10, 0.3) == 3  # 0.3 * 10 = 3.0000000000000004 in floating point
    assert keep_count(10, 0.01) == 1  # at least one entry
    assert keep_count(7, 1.0) == 7
    assert magnitude_threshold(TAU1, 0.6).item() == 1.0
    # whole-model pooling: 4 values, keep 2 -> the 2nd largest magnitude
    assert magnitude_threshold([T(10.0, 8.0), T(1.0, -2.0)], 0.5).item() == 8.0


def test_trim_does_not_modify_input():
    x = TAU2.clone()
    trim(x, 0.2)
    assert torch.equal(x, TAU2)


# -- ops: election, disjoint mean, TIES -----------------------------------------------------------
# Trimmed (density 0.6):  t1 = [ 1,  0,  2, 3, 0]
#                         t2 = [ 1, -3, -2, 0, 0]
#                         t3 = [-4,  2,  0, 5, 0]
# mass  Σ_t t:       [-2, -1, 0, 8, 0]           -> elected [-1, -1, 0, 1, 0]
# count Σ_t sign(t): [1+1-1, 0-1+1, 1-1, 1+1, 0] -> elected [ 1,  0, 0, 1, 0]
# disjoint mean, mass:  c0 {-4} -> -4, c1 {-3} -> -3, c2 tie -> 0, c3 {3, 5} -> 4, c4 -> 0
# disjoint mean, count: c0 {1, 1} -> 1, c1 tie -> 0, c2 tie -> 0, c3 {3, 5} -> 4, c4 -> 0
def test_elect_sign_mass_and_count_differ():
    stacked = torch.stack([trim(t, 0.6) for t in (TAU1, TAU2, TAU3)])
    mass = elect_sign(stacked, "mass")
    count = elect_sign(stacked, "count")
    assert mass.dtype == torch.int8
    assert torch.equal(mass, S(-1, -1, 0, 1, 0))
    assert torch.equal(count, S(1, 0, 0, 1, 0))
    assert torch.equal(disjoint_mean(stacked, mass), T(-4.0, -3.0, 0.0, 4.0, 0.0))
    assert torch.equal(disjoint_mean(stacked, count), T(1.0, 0.0, 0.0, 4.0, 0.0))


def test_ties_merge_hand_computed():
    taus = [TAU1, TAU2, TAU3]
    assert torch.equal(ties_merge(taus, 0.6, "mass"), T(-4.0, -3.0, 0.0, 4.0, 0.0))
    assert torch.equal(ties_merge(taus, 0.6, "count"), T(1.0, 0.0, 0.0, 4.0, 0.0))
    # a stacked tensor with the tasks on dim 0 is accepted too
    assert torch.equal(ties_merge(torch.stack(taus), 0.6), T(-4.0, -3.0, 0.0, 4.0, 0.0))


def test_elect_tie_gives_zero_and_no_agreement_gives_zero():
    stacked = torch.stack([T(1.0, 2.0, 0.0), T(-1.0, -2.0, 0.0)])
    assert torch.equal(elect_sign(stacked, "mass"), S(0, 0, 0))
    assert torch.equal(elect_sign(stacked, "count"), S(0, 0, 0))
    # no task has the elected sign at c0 (all negative vs +1), none non-zero at c2
    stacked = torch.stack([T(-1.0, 3.0, 0.0), T(-2.0, 1.0, 0.0)])
    assert torch.equal(disjoint_mean(stacked, S(1, 1, 1)), T(0.0, 2.0, 0.0))


def test_task_arithmetic_sum_and_weights():
    taus = [TAU1, TAU2, TAU3]
    assert torch.allclose(task_arithmetic(taus), TAU1 + TAU2 + TAU3)
    assert torch.allclose(task_arithmetic(taus, [2.0, -1.0, 0.5]), 2 * TAU1 - TAU2 + 0.5 * TAU3)


def test_ops_reject_bad_input():
    with pytest.raises(ValueError, match="density"):
        trim(TAU1, 0.0)
    with pytest.raises(ValueError, match="density"):
        magnitude_threshold(TAU1, 1.5)
    with pytest.raises(ValueError, match="count"):
        elect_sign(torch.stack([TAU1, TAU2]), "votes")
    with pytest.raises(ValueError, match="shape"):
        task_arithmetic([TAU1, T(1.0, 2.0)])
    with pytest.raises(ValueError, match="weights"):
        task_arithmetic([TAU1, TAU2], [1.0])


# -- model level ------------------------------------------------------------------------------------
def test_merge_task_vectors_matches_per_tensor_ops():
    tvs = [TaskVector({"w": t, "b": t[:2] * 2}) for t in (TAU1, TAU2, TAU3)]
    ties = merge_task_vectors(tvs, density=0.6)
    assert isinstance(ties, TaskVector)
    assert list(ties) == ["w", "b"]
    assert torch.equal(ties["w"], T(-4.0, -3.0, 0.0, 4.0, 0.0))
    ta = merge_task_vectors(tvs, "task_arithmetic", weights=[1.0, 2.0, 0.0])
    assert torch.allclose(ta["w"], TAU1 + 2 * TAU2)
    assert set(MERGE_METHODS) == {"task_arithmetic", "ties"}


# One task vector per task, tensors a and b; density 0.5.
# tensor scope: each tensor keeps its top 1 of 2.
#   tv1: a [10, 8] -> [10, 0]   b [1, -2] -> [0, -2]
#   tv2: a [-1, .5] -> [-1, 0]  b [4, 3]  -> [4, 0]
#   a: sum [9, 0] -> sign [+, 0] -> [10, 0];  b: sum [4, -2] -> [+, -] -> [4, -2]
# model scope: each task vector keeps its top 2 of 4 (threshold = 2nd largest magnitude).
#   tv1: {10, 8, 1, 2} -> threshold 8: a [10, 8], b [0, 0]
#   tv2: {1, .5, 4, 3} -> threshold 3: a [0, 0],  b [4, 3]
#   a: [10, 8];  b: [4, 3]
def test_trim_scope_model_vs_tensor():
    tv1 = TaskVector({"a": T(10.0, 8.0), "b": T(1.0, -2.0)})
    tv2 = TaskVector({"a": T(-1.0, 0.5), "b": T(4.0, 3.0)})
    per_tensor = merge_task_vectors([tv1, tv2], "ties", density=0.5, trim_scope="tensor")
    whole = merge_task_vectors([tv1, tv2], "ties", density=0.5, trim_scope="model")
    assert torch.equal(per_tensor["a"], T(10.0, 0.0))
    assert torch.equal(per_tensor["b"], T(4.0, -2.0))
    assert torch.equal(whole["a"], T(10.0, 8.0))
    assert torch.equal(whole["b"], T(4.0, 3.0))


# -- mask / merge pipelines ---------------------------------------------------------------------
TVS = [
    TaskVector({"w": T(2.0, -1.0, 0.5, 1.0), "b": T(1.0, -1.0)}),
    TaskVector({"w": T(0.0, 2.0, 0.5, -1.0), "b": T(-2.0, 1.0)}),
    TaskVector({"w": T(0.0, 1.0, -3.0, 1.0), "b": T(1.0, 1.0)}),
]
REFS = [
    {"w": S(-1, -1, 1, 1), "b": S(1, 1)},
    {"w": S(1, 1, 1, 1), "b": S(-1, 0)},
    {"w": S(1, 1, -1, 1), "b": S(1, 1)},
]


# mask-then-merge (task arithmetic): keep τ^t_i where sign(τ^t_i) = ŝ^t_i
#   τ1: w [0, -1, .5, 1]  b [1, 0]
#   τ2: w [0,  2, .5, 0]  b [-2, 0]
#   τ3: w [0,  1, -3, 1]  b [1, 1]
#   sum: w [0, 2, -2, 2]  b [0, 1]
# merge-then-mask: merged w [2, 2, -2, 1], b [0, 1]
#   consensus w: sign([-1+1+1, -1+1+1, 1+1-1, 3]) = [1, 1, 1, 1];  b: sign([1-1+1, 1+0+1]) = [1, 1]
#   masked: w [2, 2, 0, 1], b [0, 1]
# w[0]: only task 1 moves it, and its own target disagrees; the consensus keeps it.
def test_mask_then_merge_and_merge_then_mask_hand_computed():
    mtm = mask_then_merge(TVS, REFS, method="task_arithmetic")
    assert torch.equal(mtm["w"], T(0.0, 2.0, -2.0, 2.0))
    assert torch.equal(mtm["b"], T(0.0, 1.0))
    mgm = merge_then_mask(TVS, REFS, method="task_arithmetic")
    assert torch.equal(mgm["w"], T(2.0, 2.0, 0.0, 1.0))
    assert torch.equal(mgm["b"], T(0.0, 1.0))
    # the complementary coordinate: dropped by every per-task mask, kept by the consensus
    assert mtm["w"][0] == 0 and mgm["w"][0] == 2


def test_pipelines_match_brute_force_with_ties():
    gen = torch.Generator().manual_seed(0)
    tvs = [TaskVector({"w": torch.randn(6, 5, generator=gen), "b": torch.randn(7, generator=gen)})
           for _ in range(4)]
    refs = [{n: torch.randint(-1, 2, t.shape, generator=gen, dtype=torch.int8) for n, t in tv.items()}
            for tv in tvs]
    opts = {"density": 0.4, "elect": "count"}
    # mask-then-merge: agreement masks by hand, then TIES per tensor
    mtm = mask_then_merge(tvs, refs, **opts)
    for name in ("w", "b"):
        masked = [tv[name] * (torch.sign(tv[name]) == r[name]) for tv, r in zip(tvs, refs, strict=True)]
        assert torch.equal(mtm[name], ties_merge(masked, 0.4, "count"))
    # merge-then-mask: TIES per tensor, then agreement with the consensus sign
    mgm = merge_then_mask(tvs, refs, **opts)
    for name in ("w", "b"):
        merged = ties_merge([tv[name] for tv in tvs], 0.4, "count")
        consensus = torch.sign(sum(r[name].int() for r in refs))
        expected = merged * ((torch.sign(merged) == consensus) & (consensus != 0))
        assert torch.equal(mgm[name], expected)


def test_multi_source_merge_repeats_the_reference():
    ref = REFS[1]
    out = multi_source_merge(TVS, ref, method="ties", density=0.5)
    expected = mask_then_merge(TVS, [ref] * 3, method="ties", density=0.5)
    for name in out:
        assert torch.equal(out[name], expected[name])


def test_consensus_signs_skips_missing_tensors():
    refs = [{"w": S(1, -1, 1)}, {"w": S(1, 1, -1), "v": S(-1)}, {"w": S(-1, 1, 0)}]
    cons = consensus_signs(refs)
    assert torch.equal(cons["w"], S(1, 1, 0))
    assert torch.equal(cons["v"], S(-1))
    with pytest.raises(MismatchError, match="w"):
        consensus_signs([{"w": S(1, 1)}, {"w": S(1, 1, 1)}])


def test_uncovered_tensor_follows_unvoted_policy():
    refs = [{"w": r["w"]} for r in REFS]  # no reference covers "b"
    with pytest.raises(GradfixError, match="b"):
        merge_then_mask(TVS, refs, method="task_arithmetic")
    out = merge_then_mask(TVS, refs, method="task_arithmetic", mask_options={"unvoted": "drop"})
    assert torch.equal(out["w"], T(2.0, 2.0, 0.0, 1.0))
    assert torch.equal(out["b"], T(0.0, 0.0))
    kept = mask_then_merge(TVS, refs, method="task_arithmetic", mask_options={"unvoted": "keep"})
    assert torch.equal(kept["b"], T(0.0, 1.0))


def test_low_precision_inputs_keep_their_dtype():
    taus = [t.to(torch.bfloat16) for t in (TAU1, TAU2, TAU3)]
    out = ties_merge(taus, 0.6)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.float(), T(-4.0, -3.0, 0.0, 4.0, 0.0))
    assert task_arithmetic(taus).dtype == torch.bfloat16


# -- errors ------------------------------------------------------------------------------------------
def test_mismatched_task_vectors_listed_in_one_error():
    tv0 = TaskVector({"a": T(1.0, 2.0), "b": T(1.0, 2.0, 3.0)})
    tv1 = TaskVector({"a": T(1.0, 2.0, 3.0), "c": T(1.0)})
    with pytest.raises(MismatchError) as info:
        merge_task_vectors([tv0, tv1])
    message = str(info.value)
    assert "3 tensor(s)" in message
    assert "a: shapes differ" in message
    assert "b: missing in task vector 1" in message
    assert "c: missing in task vector 0" in message


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, "half"])
def test_bad_density(density):
    with pytest.raises(ConfigError, match="density"):
        merge_task_vectors(TVS, density=density)


def test_unknown_options():
    with pytest.raises(ConfigError, match="task_arithmetic, ties"):
        merge_task_vectors(TVS, "dare")
    with pytest.raises(ConfigError, match="mass, count"):
        merge_task_vectors(TVS, elect="majority")
    with pytest.raises(ConfigError, match="tensor, model"):
        merge_task_vectors(TVS, trim_scope="layer")
    with pytest.raises(ConfigError, match="weights"):
        merge_task_vectors(TVS, weights=[1.0])
    with pytest.raises(ConfigError, match="need at least one"):
        merge_task_vectors([])


def test_pipeline_errors():
    with pytest.raises(ConfigError, match="one reference per task vector"):
        mask_then_merge(TVS, REFS[:2])
    with pytest.raises(ConfigError, match="one reference per task vector"):
        merge_then_mask(TVS, REFS[:2])
    with pytest.raises(ConfigError, match="dense"):
        merge_then_mask(TVS, REFS, dense=0.3)
    with pytest.raises(ConfigError, match="unknown mask"):
        mask_then_merge(TVS, REFS, mask="hard")
    with pytest.raises(ConfigError, match="magnitude"):
        merge_then_mask(TVS, REFS, mask="magnitude")
