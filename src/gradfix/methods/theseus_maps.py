"""Theseus's maps: one (semi-)orthogonal ``T_s`` per space, solved from cross-covariances and applied.

Given each space's statistics ``C_s`` (and Gram matrices ``G``), :func:`theseus_transforms` solves
``T_s = U Vᵀ`` from ``G_A^{−p} C_s G_B^{−p} = U Σ Vᵀ`` (:func:`whitened_cross`, :func:`procrustes`),
block-wise over matched heads for head-split spaces, and :func:`apply_transforms` contracts every
axis of a tensor in space ``s`` with ``T_s``. Where the statistics come from (activations on
examples, or the weights themselves) is :mod:`gradfix.methods.theseus`'s part.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from gradfix.errors import ConfigError, MismatchError
from gradfix.methods.activations import CrossStats
from gradfix.methods.permutation_spec import PermutationSpec


def procrustes(cross: Tensor) -> Tensor:
    """``T = U Vᵀ`` for ``C = U Σ Vᵀ`` (thin SVD): ``argmax ⟨T, C⟩`` over (semi-)orthogonal ``T``.

    With ``C = X_Aᵀ X_B`` this minimises ``‖X_A T − X_B‖_F``. ``T`` is ``d_A × d_B``; when the widths
    differ its rows (``d_A < d_B``) or columns (``d_A > d_B``) are orthonormal. Directions that
    ``C`` does not see (rank-deficient statistics: fewer tokens than the width) get an arbitrary
    orthonormal completion, so record at least as many tokens as the widest space.
    """
    u, _, vh = torch.linalg.svd(cross.double(), full_matrices=False)
    return u @ vh


def inverse_power(gram: Tensor, power: float, eps: float = 1e-8) -> Tensor:
    """``G^{−p}`` of a symmetric PSD matrix by eigendecomposition, eigenvalues floored at ``eps · λ_max``."""
    if power == 0:
        return torch.eye(gram.shape[0], dtype=torch.float64)
    values, vectors = torch.linalg.eigh(gram.double())
    floor = eps * max(float(values.max()), torch.finfo(torch.float64).tiny)
    return (vectors * values.clamp(min=floor).pow(-power)) @ vectors.T


def whitened_cross(stats: CrossStats, power: float = 0.0, eps: float = 1e-8) -> Tensor:
    """Partial whitening ``C' = G_A^{−p} C G_B^{−p}`` (``p = 0``: ``C``; ``p = 0.5``: full whitening)."""
    if not 0.0 <= power <= 0.5:
        raise ConfigError(f"whitening power must be in [0, 0.5], got {power}")
    if power == 0:
        return stats.cross.double()
    return (
        inverse_power(stats.gram_a, power, eps)
        @ stats.cross.double()
        @ inverse_power(stats.gram_b, power, eps)
    )


def spec_units(spec: PermutationSpec, groups: Iterable[str]) -> list[tuple[str, ...]]:
    """Groups to solve together, in spec order: a head set's groups as one unit, others alone."""
    wanted, units, seen = set(groups), [], set()
    for group in spec.groups:
        if group in wanted and group not in seen:
            head = spec.head_set_of(group)
            unit = tuple(g for g in head.groups if g in wanted) if head else (group,)
            units.append(unit)
            seen |= set(unit)
    return units


def solve_unit(
    unit: tuple[str, ...],
    crosses: Mapping[str, Tensor],
    spec: PermutationSpec,
    target_num_heads: int | None,
) -> dict[str, Tensor]:
    """Procrustes map of each group of a unit; block-wise over matched heads for a head set."""
    head = spec.head_set_of(unit[0])
    present = [g for g in unit if g in crosses]
    if head is None:
        return {g: procrustes(crosses[g]) for g in present}
    heads_a, heads_b = head.num_heads, target_num_heads or head.num_heads
    score = torch.zeros(heads_a, heads_b, dtype=torch.float64)
    blocks = {}
    for g in present:
        d_a, d_b = crosses[g].shape
        if d_a % heads_a or d_b % heads_b:
            raise ConfigError(
                f"space {g!r}: widths {d_a}, {d_b} do not split into {heads_a}, {heads_b} heads"
            )
        blocks[g] = crosses[g].reshape(heads_a, d_a // heads_a, heads_b, d_b // heads_b).transpose(1, 2)
        score += torch.linalg.matrix_norm(blocks[g], ord="nuc")
    rows, cols = linear_sum_assignment(score.numpy(), maximize=True)
    out = {}
    for g in present:
        t = torch.zeros_like(crosses[g])
        ha, hb = blocks[g].shape[2:]
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            t[r * ha : (r + 1) * ha, c * hb : (c + 1) * hb] = procrustes(blocks[g][r, c])
        out[g] = t
    return out


def theseus_transforms(
    stats: Mapping[str, CrossStats],
    spec: PermutationSpec,
    *,
    whiten: float = 0.0,
    eps: float = 1e-8,
    target_num_heads: int | None = None,
) -> dict[str, Tensor]:
    """``{space: T_s}`` with ``T_s = U Vᵀ`` from ``G_A^{−p} C_s G_B^{−p} = U Σ Vᵀ`` (``p = whiten``).

    ``stats`` maps each space to its pooled statistics
    (:func:`~gradfix.methods.theseus.space_statistics`). Head-split
    spaces are solved per matched head (``target_num_heads`` when B has another head count).
    """
    unknown = [g for g in stats if g not in spec.groups]
    if unknown:
        raise ConfigError(f"statistics for spaces not in the spec: {unknown}")
    crosses = {g: whitened_cross(s, whiten, eps) for g, s in stats.items()}
    transforms: dict[str, Tensor] = {}
    for unit in spec_units(spec, crosses):
        transforms.update(solve_unit(unit, crosses, spec, target_num_heads))
    return transforms


def contract_axis(t: Tensor, axis: int, transform: Tensor) -> Tensor:
    """``t'[…, j, …] = Σ_i t[…, i, …] T[i, j]`` along ``axis``."""
    return torch.tensordot(t, transform, dims=([axis], [0])).movedim(-1, axis)


def apply_transforms(
    tensors: Mapping[str, Tensor], transforms: Mapping[str, Tensor], spec: PermutationSpec
) -> dict[str, Tensor]:
    """Every axis in space ``s`` contracted with ``T_s``: ``W_B = T_outᵀ W_A T_in``, ``b_B = T_sᵀ b_A``.

    Embeddings become ``E_B = E_A T_s``. Computed in float64, cast back to each tensor's dtype;
    tensors outside the spec pass through.
    """
    out = {}
    for name, t in tensors.items():
        axes = spec.axes_of(name)
        if not axes:
            out[name] = t
            continue
        work = t.double()
        for axis, space in axes.items():
            module = name.rpartition(".")[0] or name
            if space not in transforms:
                raise ConfigError(f"{name} (module {module}): no transform for space {space!r}")
            transform = transforms[space].to(work.device)
            if work.shape[axis] != transform.shape[0]:
                raise MismatchError(
                    f"{name} (module {module}): axis {axis} has width {work.shape[axis]}, but space "
                    f"{space!r} maps width {transform.shape[0]} to {transform.shape[1]}"
                )
            work = contract_axis(work, axis, transform)
        out[name] = work.to(t.dtype)
    return out
