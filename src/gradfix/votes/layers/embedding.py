"""``nn.Embedding``: row ``r`` of sample ``b`` gets ``Σ_{t: id_{b,t} = r} δ_{b,t}``.

Embeddings with ``max_norm`` (which rescales the rows it looks up) or ``sparse`` gradients are
not covered: their parameters go to the loop engine.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from gradfix.votes.layers import Calls, register_layer_rule
from gradfix.votes.per_sample import GradientSink, Workspace


def _plain_lookup(module: nn.Module) -> bool:
    """Whether the embedding is a plain lookup (no ``max_norm`` renormalisation, dense gradients)."""
    return getattr(module, "max_norm", None) is None and not getattr(module, "sparse", False)


@register_layer_rule(nn.Embedding, parameters=("weight",), covers=_plain_lookup, expand_broadcast=True)
def embedding_sums(
    module: nn.Module, calls: Calls, names: Mapping[str, str], sink: GradientSink, ws: Workspace
) -> None:
    """Per-sample embedding gradients as (sample, row used, gradient of that row), for the batch.

    Each token of each call gets the key ``sample · num_embeddings + id`` (padding ids dropped:
    ``F.embedding`` gives that row no gradient); one ``torch.unique`` numbers the (sample, row)
    pairs and one ``index_add_`` sums the gradients of each pair, which go to the sink in one call.
    """
    assert isinstance(module, nn.Embedding)
    dim = calls[0][1].shape[-1]
    ids, grads = _keys_and_grads(calls, module.num_embeddings)
    if module.padding_idx is not None:  # F.embedding gives the padding row no gradient
        keep = ids % module.num_embeddings != module.padding_idx
        ids, grads = ids[keep], grads[keep]
    keys, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    summed = torch.zeros(len(keys), dim, dtype=grads.dtype, device=grads.device).index_add_(0, inverse, grads)
    samples = torch.div(keys, module.num_embeddings, rounding_mode="floor")
    rows = keys - samples * module.num_embeddings
    sink.add_rows(names["weight"], rows, summed, samples)


def _keys_and_grads(calls: Calls, num_embeddings: int) -> tuple[Tensor, Tensor]:
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
