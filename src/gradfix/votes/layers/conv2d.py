"""``nn.Conv2d``: a convolution is a linear layer applied to each patch of its input.

With ``P_b`` the patches of sample ``b`` (``F.unfold``: ``[positions, in · kh · kw]``) and ``δ_b``
its output gradient ``[positions, out]``, ``∂ℓ_b/∂W = δ_bᵀ P_b`` (reshaped to the weight's
``[out, in, kh, kw]``) and ``∂ℓ_b/∂c = Σ_positions δ_b``. Covered: ungrouped convolutions with
zero padding given as numbers (or ``"valid"``); others go to the loop engine.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradfix.votes.layers import Calls, register_layer_rule
from gradfix.votes.layers.linear import linear_weight_sums
from gradfix.votes.per_sample import GradientSink, Workspace


def _unfoldable(module: nn.Module) -> bool:
    """Whether ``F.unfold`` gives the conv's patches: one group, zero padding of known size."""
    padding = getattr(module, "padding", None)
    return (
        getattr(module, "groups", None) == 1
        and getattr(module, "padding_mode", None) == "zeros"
        and (padding == "valid" or not isinstance(padding, str))
    )


@register_layer_rule(nn.Conv2d, covers=_unfoldable)
def conv2d_sums(
    module: nn.Module, calls: Calls, names: Mapping[str, str], sink: GradientSink, ws: Workspace
) -> None:
    """Per-sample weight and bias gradients of a 2D convolution, summed over its calls, to the sink.

    The patches of every call are put side by side (a sample's gradient is the sum over its calls'
    positions), and the weight is done as a linear layer over them (:func:`linear_weight_sums`).
    """
    assert isinstance(module, nn.Conv2d)
    padding = 0 if isinstance(module.padding, str) else module.padding  # "valid": the only text covered
    patches: list[Tensor] = []
    grads: list[Tensor] = []
    for x, g in calls:
        b = g.shape[0]
        cols = F.unfold(x.to(g.dtype), module.kernel_size, module.dilation, padding, module.stride)
        patches.append(cols.transpose(1, 2))  # [b, positions, in · kh · kw]
        grads.append(g.reshape(b, g.shape[1], -1).transpose(1, 2))  # [b, positions, out]
    x_all = patches[0] if len(calls) == 1 else torch.cat(patches, dim=1)
    g_all = grads[0] if len(calls) == 1 else torch.cat(grads, dim=1)
    if "weight" in names:
        linear_weight_sums(names["weight"], x_all, g_all, sink, ws)
    if "bias" in names:
        sink.add_per_sample(names["bias"], g_all.sum(dim=1))
