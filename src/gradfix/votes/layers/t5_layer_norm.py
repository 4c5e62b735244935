"""T5's layer norm (an RMS norm without bias): ``∂ℓ_b/∂γ = Σ_t δ_{b,t} ⊙ x̂_{b,t}``.

``T5LayerNorm`` computes ``γ ⊙ x̂`` with ``x̂ = x / sqrt(mean(x²) + ε)`` over the last axis
(the mean in float32, ``x̂`` cast to ``γ``'s dtype when that is half precision), ``t`` runs over
the axes between the sample axis and the last one. mT5, UMT5 and LongT5 have copies of the
class under their own names, with the same ``forward``. The classes are registered by name, so
that ``transformers`` is not imported to register them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from gradfix.votes.layers import Calls, register_layer_rule
from gradfix.votes.per_sample import GradientSink, Workspace

T5_LAYER_NORMS = tuple(
    f"transformers.models.{family}.modeling_{family}.{prefix}LayerNorm"
    for family, prefix in (("t5", "T5"), ("mt5", "MT5"), ("umt5", "UMT5"), ("longt5", "LongT5"))
)
"""The dotted names of the layer-norm classes of the T5 family in ``transformers``."""


def _has_rms_state(module: nn.Module) -> bool:
    """Whether the module holds what T5's forward reads: a 1-D ``weight`` and ``variance_epsilon``."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, Tensor) and weight.dim() == 1 and hasattr(module, "variance_epsilon")


def normalized(x: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """``x̂`` as T5's layer norm computes it (``dtype``: its weight's)."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    x_hat = x * torch.rsqrt(variance + eps)
    if dtype in (torch.float16, torch.bfloat16):
        x_hat = x_hat.to(dtype)
    return x_hat


@register_layer_rule(*T5_LAYER_NORMS, parameters=("weight",), covers=_has_rms_state)
def t5_layer_norm_sums(
    module: nn.Module, calls: Calls, names: Mapping[str, str], sink: GradientSink, ws: Workspace
) -> None:
    """Per-sample gradients of a T5 layer norm's ``γ`` (``weight``), summed over its calls."""
    weight = module.weight
    assert isinstance(weight, Tensor)
    eps = float(getattr(module, "variance_epsilon", 1e-6))  # covered modules have it
    total: Tensor | None = None
    for x, g in calls:
        x_hat = normalized(x, eps, weight.dtype).to(g.dtype)
        per_sample = (g * x_hat).reshape(g.shape[0], -1, g.shape[-1]).sum(dim=1)
        total = per_sample if total is None else total + per_sample
    if total is not None:
        sink.add_per_sample(names["weight"], total)
