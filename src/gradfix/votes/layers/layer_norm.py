"""``nn.LayerNorm``: ``∂ℓ_b/∂γ = Σ_t δ_{b,t} ⊙ x̂_{b,t}`` and ``∂ℓ_b/∂β = Σ_t δ_{b,t}``.

``x̂`` is the input normalised over ``normalized_shape`` (no affine), ``t`` runs over the axes
between the sample axis and the normalised ones.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn
from torch.nn import functional as F

from gradfix.votes.layers import Calls, register_layer_rule
from gradfix.votes.per_sample import GradientSink, Workspace


@register_layer_rule(nn.LayerNorm)
def layer_norm_sums(
    module: nn.Module, calls: Calls, names: Mapping[str, str], sink: GradientSink, ws: Workspace
) -> None:
    """Per-sample gradients of a layer norm's ``γ`` (``weight``) and ``β`` (``bias``), summed over calls."""
    assert isinstance(module, nn.LayerNorm)
    shape = module.normalized_shape
    weight: Tensor | None = None
    bias: Tensor | None = None
    for x, g in calls:
        b = g.shape[0]
        if "weight" in names:
            x_hat = F.layer_norm(x.to(g.dtype), shape, None, None, module.eps)
            w = (g * x_hat).reshape(b, -1, *shape).sum(dim=1)
            weight = w if weight is None else weight + w
        bb = g.reshape(b, -1, *shape).sum(dim=1)
        bias = bb if bias is None else bias + bb
    if weight is not None:
        sink.add_per_sample(names["weight"], weight)
    del weight
    if "bias" in names and bias is not None:
        sink.add_per_sample(names["bias"], bias)
