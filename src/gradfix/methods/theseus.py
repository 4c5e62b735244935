"""Theseus: transport a task vector across models of different widths by orthogonal Procrustes.

Every group of a :class:`~gradfix.methods.permutation_spec.PermutationSpec` is a *space* (the hidden
units between two layers of an MLP, a transformer's residual stream, one layer's FFN units, its
query/key and value/output head spaces). Each space ``s`` gets one (semi-)orthogonal map ``T_s``
(``d_A × d_B``) from the cross-covariance of A's and B's activations in that space on the same
inputs:

```
C_s  = Σ_sites X_Aᵀ X_B                       (float64, over tokens and every site of s)
C_s' = G_A^{−p} C_s G_B^{−p},   G = Σ Xᵀ X,   p ∈ [0, 0.5]   (partial whitening)
C_s' = U Σ Vᵀ  →  T_s = U Vᵀ                  (argmin over semi-orthogonal T of ‖X_A T − X_B‖_F)
```

Optional mean-centring (``center=True``): every site's activations are centred by that site's own
means ``μ`` (over all recorded tokens) before they are pooled into its space,
``C_s = Σ_sites Σ_tokens (x_A − μ_A)ᵀ (x_B − μ_B)`` and ``G`` likewise, computed exactly from
float64 sums (:meth:`~gradfix.methods.activations.CrossStats.centered`). Without it, large channel means
(e.g. after GELU) can dominate ``C_s``.

Every axis of ``τ_A`` in space ``s`` is contracted with ``T_s``; a weight ``W (out × in)`` becomes
``ΔW_B = T_outᵀ ΔW_A T_in``, a bias or norm vector ``Δb_B = T_sᵀ Δb_A``, an embedding
``ΔE_B = ΔE_A T_s``. Consecutive modules share a space, so ``T_out`` of layer ``l`` is ``T_in`` of
layer ``l+1``; axes outside the spec (model inputs and outputs) are left as they are.

Sites of a space (:func:`spec_sites`): the output of an ``nn.Linear`` whose weight rows (axis 0)
are in it, the input of one whose columns (axis 1) are, the same for the output and input channels
of a convolution (``[out, in, *kernel]``; activations ``[B, C, H, W]`` are ``B·H·W`` tokens of width
``C``), the output of an ``nn.Embedding`` (axis 1) and of a norm layer (axis 0). Head-split spaces
(attention) get a block map: heads are matched by the Hungarian assignment maximising
``Σ ‖C'_{hA,hB}‖_*`` (each block's best Procrustes score, query/key and value/output spaces
together) and each matched block gets its own Procrustes map.

The maps themselves (whitening, Procrustes, head matching, applying them to tensors) are in
:mod:`gradfix.methods.theseus_maps` and re-exported here; this module gathers the statistics they
are solved from: activations on examples, or (data-free) the two models' weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn

from gradfix.errors import ConfigError, MismatchError
from gradfix.methods.activations import (
    CrossStats,
    ForwardFn,
    Site,
    TokenMask,
    attention_mask_of,
    cross_statistics,
)
from gradfix.methods.permutation_spec import (
    PermutationSpec,
    present_spec,
    spec_for_module,
    spec_for_state_dict,
)
from gradfix.methods.theseus_maps import (
    apply_transforms,
    contract_axis,
    inverse_power,
    procrustes,
    solve_unit,
    spec_units,
    theseus_transforms,
    whitened_cross,
)
from gradfix.task_vector import TaskVector


def spec_sites(model: nn.Module, spec: PermutationSpec) -> dict[str, list[Site]]:
    """``{space: [sites]}``: where each space's activations can be observed in ``model``.

    ``nn.Linear`` weight axis 0 → its output, axis 1 → its input; a convolution (``nn.Conv1d/2d/3d``,
    ``groups=1``) likewise for its output and input channels; ``nn.Embedding`` axis 1 → its
    output; a norm layer's weight → its output. Only ``*.weight`` entries name sites.
    """
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
    sites: dict[str, list[Site]] = {}
    for space, axes in spec.groups.items():
        found: list[Site] = []
        for tensor, axis in axes:
            module_name, _, leaf = tensor.rpartition(".")
            if leaf != "weight":
                continue
            try:
                module = model.get_submodule(module_name)
            except AttributeError as exc:
                raise ConfigError(f"module {module_name!r} (space {space!r}) not found in the model") from exc
            if isinstance(module, nn.modules.conv._ConvNd) and module.groups != 1 and axis < 2:
                raise ConfigError(
                    f"module {module_name!r} (space {space!r}): a grouped convolution (groups="
                    f"{module.groups}) mixes only its own groups of channels; Theseus needs groups=1"
                )
            if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and axis < 2:
                transposed = getattr(module, "transposed", False)  # ConvTranspose: [in, out, *kernel]
                found.append(Site(module_name, "output" if (axis == 0) != transposed else "input"))
            elif (isinstance(module, nn.Embedding) and axis == 1) or (
                isinstance(module, norms) and axis == 0
            ):
                found.append(Site(module_name, "output"))
            else:
                raise ConfigError(
                    f"module {module_name!r} ({type(module).__name__}, space {space!r}): Theseus records "
                    "nn.Linear, convolutions, nn.Embedding and norm layers"
                )
        if not found:
            raise ConfigError(f"space {space!r} has no module whose activations can be recorded")
        sites[space] = list(dict.fromkeys(found))
    return sites


def space_statistics(
    model_a: nn.Module,
    model_b: nn.Module,
    batches: Iterable[Any],
    spec: PermutationSpec,
    forward_fn: ForwardFn | None = None,
    *,
    forward_fn_b: ForwardFn | None = None,
    token_mask: TokenMask | None = attention_mask_of,
    center: bool = False,
) -> dict[str, CrossStats]:
    """Per space, ``C_s = Σ_sites Σ_tokens X_Aᵀ X_B`` and the Gram matrices, both models in lockstep.

    ``center=True``: ``C_s = Σ_sites Σ_tokens (x_A − μ_A)ᵀ (x_B − μ_B)`` (and ``G`` likewise), each
    site centred by its own means before pooling. Every site of a space must have the same width
    within a model, else a :class:`MismatchError` names the module.
    """
    sites = spec_sites(model_a, spec)
    per_site = cross_statistics(
        model_a,
        model_b,
        batches,
        [s for group in sites.values() for s in group],
        forward_fn,
        forward_fn_b=forward_fn_b,
        token_mask=token_mask,
        center=center,
    )
    pooled: dict[str, CrossStats] = {}
    for space, group in sites.items():
        for site in group:
            stats = per_site[site]
            if space in pooled and pooled[space].widths != stats.widths:
                raise MismatchError(
                    f"module {site.module!r} ({site.kind}) has widths {stats.widths} (A, B), but space "
                    f"{space!r} has {pooled[space].widths}"
                )
            pooled[space] = pooled[space] + stats if space in pooled else stats
    return pooled


def theseus_task_vector(
    tau_a: Mapping[str, Tensor],
    stats: Mapping[str, CrossStats],
    spec: PermutationSpec,
    *,
    whiten: float = 0.0,
    eps: float = 1e-8,
    target_num_heads: int | None = None,
) -> TaskVector:
    """Theseus: ``ΔW_B = T_outᵀ ΔW_A T_in``, ``Δb_B = T_sᵀ Δb_A``, ``ΔE_B = ΔE_A T_s`` with data-driven ``T``.

    ``stats`` from :func:`space_statistics` (centred there with ``center=True``, site by site, as
    pooled statistics no longer know each site's means); ``whiten`` is the partial-whitening power ``p``.
    """
    transforms = theseus_transforms(stats, spec, whiten=whiten, eps=eps, target_num_heads=target_num_heads)
    return TaskVector(apply_transforms(tau_a, transforms, spec))


def theseus_from_models(
    tau_a: Mapping[str, Tensor],
    model_a: nn.Module,
    model_b: nn.Module,
    batches: Iterable[Any],
    spec: PermutationSpec | None = None,
    *,
    forward_fn: ForwardFn | None = None,
    whiten: float = 0.0,
    eps: float = 1e-8,
    token_mask: TokenMask | None = attention_mask_of,
    center: bool = False,
) -> TaskVector:
    """Theseus in one call: record ``C_s`` of A and B on ``batches``, then ``τ_B = T(τ_A)``.

    ``spec`` defaults to :func:`~gradfix.methods.permutation_spec.spec_for_module` of A; B's head count
    is read from ``model_b.config.num_attention_heads`` when it has one. ``center=True`` mean-centres
    the statistics (:func:`space_statistics`).
    """
    spec = spec or spec_for_module(model_a)
    heads = getattr(getattr(model_b, "config", None), "num_attention_heads", None)
    stats = space_statistics(
        model_a, model_b, batches, spec, forward_fn, token_mask=token_mask, center=center
    )
    return theseus_task_vector(tau_a, stats, spec, whiten=whiten, eps=eps, target_num_heads=heads)


def weight_statistics(
    source: Mapping[str, Tensor],
    target: Mapping[str, Tensor],
    spec: PermutationSpec,
    space: str,
    transforms: Mapping[str, Tensor],
) -> CrossStats | None:
    """Weights standing in for activations: ``C_s = Σ_{(W, axis) ∈ s} X_Aᵀ X_B``.

    ``X_A`` is ``W_A`` with every other axis mapped into B's coordinates by its current ``T`` and
    ``axis`` last, flattened to ``[rows, d_A]``; ``X_B`` is ``W_B`` alike. For a linear layer this is
    ``C_in = W_Aᵀ T_out W_B`` and ``C_out = W_A T_in W_Bᵀ``; biases and norm vectors give ``b_A b_Bᵀ``,
    embeddings ``E_Aᵀ E_B``. Terms whose other axes have no ``T`` yet are skipped (``None`` if all are).
    """
    total: CrossStats | None = None
    for tensor, axis in spec.groups[space]:
        w_a: Tensor | None = source[tensor].double()
        for other, group in spec.axes_of(tensor).items():
            if other != axis and w_a is not None:
                w_a = contract_axis(w_a, other, transforms[group]) if group in transforms else None
        if w_a is None:
            continue
        x_a = w_a.movedim(axis, -1).reshape(-1, w_a.shape[axis])
        w_b = target[tensor].double()
        x_b = w_b.movedim(axis, -1).reshape(-1, w_b.shape[axis])
        if x_a.shape[0] != x_b.shape[0]:
            shapes = f"{list(source[tensor].shape)} (source) and {list(w_b.shape)} (target)"
            raise MismatchError(f"{tensor}: shapes {shapes} differ outside the spec's spaces")
        stats = CrossStats.from_rows(x_a, x_b)
        total = stats if total is None else total + stats
    return total


def data_free_transforms(
    source: Mapping[str, Tensor],
    target: Mapping[str, Tensor],
    spec: PermutationSpec,
    *,
    rounds: int = 5,
    whiten: float = 0.0,
    eps: float = 1e-8,
    target_num_heads: int | None = None,
    tol: float = 1e-6,
) -> dict[str, Tensor]:
    """Data-free ``T_s = procrustes(G_A^{−p} C_s G_B^{−p})`` with ``C_s`` from :func:`weight_statistics`.

    Spaces are solved one after the other, each with the other spaces' current maps (unknown ones
    left out: the first pass is anchored by the fixed inputs and outputs and by embeddings), in spec
    order and then in reverse, alternately, for up to ``rounds`` passes or until no map moves by more
    than ``tol``.
    """
    spec = present_spec(spec, source, target, same_shapes=False)
    transforms: dict[str, Tensor] = {}
    units = spec_units(spec, spec.groups)
    for sweep in range(rounds):
        change = 0.0
        for unit in units if sweep % 2 == 0 else units[::-1]:
            stats = {
                g: s
                for g in unit
                if (s := weight_statistics(source, target, spec, g, transforms)) is not None
            }
            crosses = {g: whitened_cross(s, whiten, eps) for g, s in stats.items()}
            for g, t in solve_unit(unit, crosses, spec, target_num_heads).items():
                old = transforms.get(g)
                change = max(change, float("inf") if old is None else float((t - old).abs().max()))
                transforms[g] = t
        if change <= tol:
            break
    unsolved = [g for g in spec.groups if g not in transforms]
    if unsolved:
        raise ConfigError(
            f"spaces {unsolved} are not connected to any fixed axis; cannot solve them from weights"
        )
    return transforms


def theseus_data_free_task_vector(
    tau_a: Mapping[str, Tensor],
    source_base: Mapping[str, Tensor],
    target_base: Mapping[str, Tensor],
    spec: PermutationSpec | None = None,
    *,
    num_heads: int | None = None,
    target_num_heads: int | None = None,
    rounds: int = 5,
    whiten: float = 0.0,
) -> TaskVector:
    """Data-free Theseus: ``τ_B = T(τ_A)`` with ``T`` from :func:`data_free_transforms` of the two bases.

    ``spec`` defaults to :func:`~gradfix.methods.permutation_spec.spec_for_state_dict` of the source base
    (``num_heads`` for BERT-like models).
    """
    if spec is None:
        spec = spec_for_state_dict(source_base, num_heads=num_heads)
    transforms = data_free_transforms(
        source_base, target_base, spec, rounds=rounds, whiten=whiten, target_num_heads=target_num_heads
    )
    return TaskVector(apply_transforms(tau_a, transforms, spec))


__all__ = [
    "apply_transforms",
    "data_free_transforms",
    "inverse_power",
    "procrustes",
    "space_statistics",
    "spec_sites",
    "theseus_data_free_task_vector",
    "theseus_from_models",
    "theseus_task_vector",
    "theseus_transforms",
    "weight_statistics",
    "whitened_cross",
]
