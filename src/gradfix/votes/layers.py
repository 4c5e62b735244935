"""Per-sample gradients of one module's parameters from its inputs and output gradients.

For a call with input ``x`` ``[b, …, in]`` and output gradient ``δ`` ``[b, …, out]``:

- linear: ``∂ℓ_b/∂W = Σ_t δ_{b,t} x_{b,t}ᵀ`` and ``∂ℓ_b/∂c = Σ_t δ_{b,t}`` (bias);
- layer norm: ``∂ℓ_b/∂γ = Σ_t δ_{b,t} ⊙ x̂_{b,t}`` and ``∂ℓ_b/∂β = Σ_t δ_{b,t}``;
- embedding: row ``r`` of sample ``b`` gets ``Σ_{t: id_{b,t} = r} δ_{b,t}``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gradfix.votes.per_sample import GradientSink, Workspace


def module_sums(
    module: nn.Module,
    calls: list[tuple[Tensor, Tensor]],
    names: Mapping[str, str],
    sink: GradientSink,
    ws: Workspace,
) -> None:
    """Hand the per-sample gradients of one module's parameters (from its calls) to the sink."""
    if isinstance(module, nn.Embedding):
        _embedding_rows(module, calls, names["weight"], sink)
        return
    if isinstance(module, nn.Linear) and len(calls) == 1 and "weight" in names:
        x, g = calls[0]
        _linear_weight_sums(names["weight"], x, g, sink, ws)
        if "bias" in names:
            sink.add_per_sample(names["bias"], g.reshape(g.shape[0], -1, g.shape[-1]).sum(dim=1))
        return
    weight, bias = _per_sample_affine(module, calls)
    if "weight" in names:
        sink.add_per_sample(names["weight"], weight)
    del weight
    if "bias" in names and bias is not None:
        sink.add_per_sample(names["bias"], bias)


def _linear_weight_sums(name: str, x: Tensor, g: Tensor, sink: GradientSink, ws: Workspace) -> None:
    """Per-sample gradients of a linear weight, ``G_b = δ_bᵀ x_b``, to the sink.

    A sink that forms them itself (``add_linear``: the C kernel counts them tile by tile, never
    storing them) gets ``x`` and ``δ``. Otherwise the ``G_b`` of a chunk of samples (about
    ``ws.chunk_bytes``) are formed in the workspace and passed to ``sink.add_per_sample``, which
    reduces them (votes and sums) before the next chunk overwrites them. Summing the products
    there is cheaper than a separate batched product ``δᵀ x`` for ``Σ_b G_b`` (measured on
    MiniLM: about 30 ms against 190 ms).
    """
    b, out_dim, in_dim = g.shape[0], g.shape[-1], x.shape[-1]
    g3, x2 = g.reshape(b, -1, out_dim), x.reshape(b, -1, in_dim).to(g.dtype)
    if sink.add_linear(name, x2, g3):
        return
    size = out_dim * in_dim
    g_t = g3.transpose(1, 2)
    chunk = max(1, min(b, ws.chunk_bytes // (size * g.element_size())))
    scratch = ws.take(chunk * size, g.dtype, g.device)
    for start in range(0, b, chunk):
        stop = min(b, start + chunk)
        products = scratch[: (stop - start) * size].view(stop - start, out_dim, in_dim)
        torch.bmm(g_t[start:stop], x2[start:stop], out=products)
        sink.add_per_sample(name, products)


def _per_sample_affine(module: nn.Module, calls: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor | None]:
    """Per-sample weight and bias gradients of a linear or layer-norm module, summed over calls."""
    weight: Tensor | None = None
    bias: Tensor | None = None
    for x, g in calls:
        b = g.shape[0]
        if isinstance(module, nn.Linear):
            g2 = g.reshape(b, -1, g.shape[-1])
            w = torch.bmm(g2.transpose(1, 2), x.reshape(b, -1, x.shape[-1]).to(g2.dtype))
            bb = g2.sum(dim=1)
        else:  # LayerNorm: ∂ℓ/∂γ = Σ_t δ_t ⊙ x̂_t, ∂ℓ/∂β = Σ_t δ_t
            shape = module.normalized_shape
            x_hat = F.layer_norm(x.to(g.dtype), shape, None, None, module.eps)
            w = (g * x_hat).reshape(b, -1, *shape).sum(dim=1)
            bb = g.reshape(b, -1, *shape).sum(dim=1)
        weight = w if weight is None else weight + w
        bias = bb if bias is None else bias + bb
    assert weight is not None
    return weight, bias


def _embedding_rows(
    module: nn.Embedding, calls: list[tuple[Tensor, Tensor]], name: str, sink: GradientSink
) -> None:
    """Per-sample embedding gradients as (sample, row used, gradient of that row), for the batch.

    Each token of each call gets the key ``sample · num_embeddings + id`` (padding ids dropped:
    ``F.embedding`` gives that row no gradient); one ``torch.unique`` numbers the (sample, row)
    pairs and one ``index_add_`` sums the gradients of each pair, which go to the sink in one call.
    """
    dim = calls[0][1].shape[-1]
    ids, grads = _embedding_keys_and_grads(calls, module.num_embeddings)
    if module.padding_idx is not None:  # F.embedding gives the padding row no gradient
        keep = ids % module.num_embeddings != module.padding_idx
        ids, grads = ids[keep], grads[keep]
    keys, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    summed = torch.zeros(len(keys), dim, dtype=grads.dtype, device=grads.device).index_add_(0, inverse, grads)
    samples = torch.div(keys, module.num_embeddings, rounding_mode="floor")
    rows = keys - samples * module.num_embeddings
    sink.add_rows(name, rows, summed, samples)


def _embedding_keys_and_grads(
    calls: list[tuple[Tensor, Tensor]], num_embeddings: int
) -> tuple[Tensor, Tensor]:
    """Keys ``sample · num_embeddings + id`` of every token of every call, and their output gradients.

    Calls come one after another, each sample-major (``[b, tokens]`` flattened), so the tokens of
    one sample keep their order (calls in order, tokens in order).
    """
    b, dim = calls[0][1].shape[0], calls[0][1].shape[-1]
    offsets = torch.arange(b, device=calls[0][0].device, dtype=torch.int64).mul_(num_embeddings).unsqueeze(1)
    keys = [(idx.reshape(b, -1).to(torch.int64) + offsets).reshape(-1) for idx, _ in calls]
    grads = [g.reshape(-1, dim) for _, g in calls]
    if len(calls) == 1:
        return keys[0], grads[0]
    return torch.cat(keys), torch.cat(grads)
