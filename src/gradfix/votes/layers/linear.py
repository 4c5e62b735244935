"""``nn.Linear``: ``∂ℓ_b/∂W = Σ_t δ_{b,t} x_{b,t}ᵀ`` and ``∂ℓ_b/∂c = Σ_t δ_{b,t}`` (bias).

For an input ``x`` ``[b, …, in]`` and output gradient ``δ`` ``[b, …, out]``, ``t`` running over
the middle axes (tokens).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from gradfix.votes.layers import Calls, register_layer_rule
from gradfix.votes.per_sample import GradientSink, Workspace


@register_layer_rule(nn.Linear)
def linear_sums(
    module: nn.Module, calls: Calls, names: Mapping[str, str], sink: GradientSink, ws: Workspace
) -> None:
    """Per-sample weight and bias gradients of a linear layer, summed over its calls, to the sink.

    One call: the weight's per-sample gradients are formed a chunk of samples at a time (or by the
    sink itself, see :func:`linear_weight_sums`). Several calls (a layer used twice): each call's
    ``δ_bᵀ x_b`` is formed whole and the calls are summed.
    """
    if len(calls) == 1:
        x, g = calls[0]
        if "weight" in names:
            linear_weight_sums(names["weight"], x, g, sink, ws)
        if "bias" in names:
            sink.add_per_sample(names["bias"], g.reshape(g.shape[0], -1, g.shape[-1]).sum(dim=1))
        return
    weight: Tensor | None = None
    bias: Tensor | None = None
    for x, g in calls:
        b = g.shape[0]
        g2 = g.reshape(b, -1, g.shape[-1])
        if "weight" in names:
            w = torch.bmm(g2.transpose(1, 2), x.reshape(b, -1, x.shape[-1]).to(g2.dtype))
            weight = w if weight is None else weight + w
        bb = g2.sum(dim=1)
        bias = bb if bias is None else bias + bb
    if weight is not None:
        sink.add_per_sample(names["weight"], weight)
    del weight
    if "bias" in names and bias is not None:
        sink.add_per_sample(names["bias"], bias)


def linear_weight_sums(name: str, x: Tensor, g: Tensor, sink: GradientSink, ws: Workspace) -> None:
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
