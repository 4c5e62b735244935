"""TransFusion: data-free re-basin of a task vector onto a permuted target by weight matching.

Hidden units of an MLP, the FFN units, attention heads, the dimensions within a head and the
residual stream of a transformer can be permuted without changing the function. A
:class:`PermutationSpec` says which tensor axes share a permutation (a *group*); weight matching
finds, for every group, the permutation ``P_g`` of the source's units that best lines the source
weights up with the target's, and the source task vector is permuted the same way:

```
P_g = argmax_P  Σ_{(W, axis) ∈ g} ⟨P(W_A), W_B⟩        (other groups' permutations held fixed)
τ_B = P(τ_A)
```

A permutation is stored as a ``LongTensor p``: source unit ``p[j]`` goes to target position ``j``
(``W' = W.index_select(axis, p)``). The same spec describes the spaces of Theseus
(:mod:`gradfix.methods.theseus`), where a group is a space and ``P`` becomes an orthogonal map.

This module holds the matching and the applying of permutations; the spec, its builders and the
layout detection live in :mod:`gradfix.methods.permutation_spec` and are re-exported here.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from gradfix.errors import MismatchError
from gradfix.methods.permutation_spec import (
    Axis,
    HeadSet,
    PermutationSpec,
    StateDict,
    bert_spec,
    mlp_spec,
    present_spec,
    spec_for_module,
    spec_for_state_dict,
)
from gradfix.task_vector import TaskVector


def _similarity(a: StateDict, b: StateDict, spec: PermutationSpec, perms: StateDict, group: str) -> Tensor:
    """``S[j, k] = Σ_{(W, axis) ∈ group} ⟨W_B[j], P_{−group}(W_A)[k]⟩`` (slices along ``axis``)."""
    n = len(perms[group])
    sim = torch.zeros(n, n, dtype=torch.float64)
    for tensor, axis in spec.groups[group]:
        w_a = a[tensor]
        for other, g in spec.axes_of(tensor).items():
            if other != axis:
                w_a = w_a.index_select(other, perms[g])
        sim += b[tensor].movedim(axis, 0).reshape(n, -1) @ w_a.movedim(axis, 0).reshape(n, -1).T
    return sim


def head_spectra(tensor: Tensor, axis: int, num_heads: int) -> Tensor:
    """Singular values of each head's slice: ``s(W^h)`` for ``W^h = W[h·d:(h+1)·d]`` along ``axis``.

    Spectra do not change under permutations within a head or of the other axes, so heads can be
    matched before anything else is known. Returns ``[num_heads, min(d, rest)]``.
    """
    n = tensor.shape[axis]
    blocks = tensor.double().movedim(axis, 0).reshape(num_heads, n // num_heads, -1)
    return torch.linalg.svdvals(blocks)


def match_heads(a: StateDict, b: StateDict, spec: PermutationSpec, head_set: HeadSet) -> Tensor:
    """Head permutation ``σ`` minimising ``Σ_j Σ_W ‖s(W_B^j) − s(W_A^{σ(j)})‖₂`` (Hungarian).

    The sum runs over every (tensor, axis) of the head set's groups; ``σ[j]`` is the source head
    placed at target head ``j``.
    """
    h = head_set.num_heads
    cost = torch.zeros(h, h, dtype=torch.float64)
    for group in head_set.groups:
        for tensor, axis in spec.groups[group]:
            cost += torch.cdist(head_spectra(b[tensor], axis, h), head_spectra(a[tensor], axis, h))
    _, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(cols, dtype=torch.long)


def _assign(sim: Tensor, heads: tuple[Tensor, int] | None) -> Tensor:
    """Hungarian ``argmax_p Σ_j S[j, p[j]]``; within the matched head blocks when ``heads`` is given."""
    if heads is None:
        return torch.as_tensor(linear_sum_assignment(sim.numpy(), maximize=True)[1], dtype=torch.long)
    sigma, d = heads
    perm = torch.empty(sim.shape[0], dtype=torch.long)
    for j, src in enumerate(sigma.tolist()):
        _, cols = linear_sum_assignment(
            sim[j * d : (j + 1) * d, src * d : (src + 1) * d].numpy(), maximize=True
        )
        perm[j * d : (j + 1) * d] = src * d + torch.as_tensor(cols)
    return perm


def match_permutations(
    source: StateDict, target: StateDict, spec: PermutationSpec, *, max_iter: int = 100, seed: int = 0
) -> dict[str, Tensor]:
    """Weight matching: ``P = argmax_P Σ_g Σ_{(W, axis) ∈ g} ⟨P(W_A), W_B⟩`` by coordinate descent.

    Attention heads are matched first by their singular-value spectra (:func:`match_heads`) and
    stay fixed. Then, for up to ``max_iter`` rounds, every group in a seeded random order gets the
    Hungarian assignment of its similarity ``S`` (other groups held fixed; head-split groups are
    assigned within each matched head); the loop stops after a round with no improvement.
    Returns ``{group: p}`` with ``p[j]`` the source unit placed at target position ``j``.
    """
    spec = present_spec(spec, source, target)
    sizes = spec.sizes(source)
    a = {n: source[n].detach().double() for n in spec.tensor_names()}
    b = {n: target[n].detach().double() for n in spec.tensor_names()}
    perms = {g: torch.arange(n) for g, n in sizes.items()}
    heads: dict[str, tuple[Tensor, int]] = {}
    for head_set in spec.head_sets.values():
        sigma = match_heads(a, b, spec, head_set)
        for g in head_set.groups:
            d = sizes[g] // head_set.num_heads
            heads[g] = (sigma, d)
            perms[g] = (sigma[:, None] * d + torch.arange(d)).reshape(-1)
    groups = list(sizes)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        progress = False
        for index in torch.randperm(len(groups), generator=generator).tolist():
            group = groups[index]
            sim = _similarity(a, b, spec, perms, group)
            new = _assign(sim, heads.get(group))
            rows = torch.arange(len(new))
            old_score, new_score = float(sim[rows, perms[group]].sum()), float(sim[rows, new].sum())
            if new_score > old_score + 1e-12 * max(1.0, abs(old_score)):
                perms[group], progress = new, True
        if not progress:
            break
    return perms


def apply_permutations(tensors: StateDict, perms: StateDict, spec: PermutationSpec) -> dict[str, Tensor]:
    """``P(W)``: every axis in a permuted group re-indexed, ``W' = W.index_select(axis, p_g)``.

    Works on state dicts and task vectors alike; tensors outside the spec pass through unchanged.
    """
    out = {}
    for name, t in tensors.items():
        for axis, group in spec.axes_of(name).items():
            if group not in perms:
                continue
            if t.shape[axis] != len(perms[group]):
                units = f"{t.shape[axis]} units but group {group!r} permutes {len(perms[group])}"
                raise MismatchError(f"{name}: axis {axis} has {units}")
            t = t.index_select(axis, perms[group].to(t.device))
        out[name] = t
    return out


def alignment(source: StateDict, target: StateDict, spec: PermutationSpec, perms: StateDict) -> float:
    """Cosine ``⟨P(θ_A), θ_B⟩ / (‖θ_A‖ ‖θ_B‖)`` over the spec's tensors: how well the bases line up."""
    permuted = apply_permutations(
        {n: source[n].double() for n in spec.tensor_names() if n in source}, perms, spec
    )
    dot = sum(float((permuted[n] * target[n].double()).sum()) for n in permuted)
    norm_a = sum(float(t.pow(2).sum()) for t in permuted.values()) ** 0.5
    norm_b = sum(float(target[n].double().pow(2).sum()) for n in permuted) ** 0.5
    return dot / (norm_a * norm_b) if norm_a and norm_b else 0.0


def transfusion_task_vector(
    tau_a: StateDict,
    source_base: StateDict,
    target_base: StateDict,
    spec: PermutationSpec | None = None,
    *,
    num_heads: int | None = None,
    max_iter: int = 100,
    seed: int = 0,
) -> TaskVector:
    """TransFusion: ``τ_B = P(τ_A)`` with ``P`` from weight matching ``θ_A`` onto ``θ_B`` (data-free).

    ``spec`` defaults to :func:`spec_for_state_dict` of the source base (``num_heads`` for
    BERT-like models). The result lives in the target's coordinates: add it with
    ``TaskVector.apply_to`` or mask it first (e.g. GradFix's agreement mask).
    """
    if spec is None:
        spec = spec_for_state_dict(source_base, num_heads=num_heads)
    perms = match_permutations(source_base, target_base, spec, max_iter=max_iter, seed=seed)
    return TaskVector(apply_permutations(tau_a, perms, spec))


__all__ = [
    "Axis",
    "HeadSet",
    "PermutationSpec",
    "StateDict",
    "alignment",
    "apply_permutations",
    "bert_spec",
    "head_spectra",
    "match_heads",
    "match_permutations",
    "mlp_spec",
    "present_spec",
    "spec_for_module",
    "spec_for_state_dict",
    "transfusion_task_vector",
]
