"""The class token of ``transformers``' CLIP image embeddings (``CLIPVisionEmbeddings``).

The module's output is ``[class token; patch embeddings] + position embeddings``: its own parameter
``class_embedding`` ``[D]`` is added to position 0 of every sample's output ``[b, 1 + patches, D]``,
so ``∂ℓ_b/∂class_embedding = δ_{b,0}``. The patch embedding (``nn.Conv2d``) and the position
embedding (``nn.Embedding``) are sub-modules with rules of their own. Registered by import path, so
nothing here imports ``transformers``.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from gradfix.votes.layers import Calls, register_layer_rule
from gradfix.votes.per_sample import GradientSink, Workspace

CLIP_VISION_EMBEDDINGS = "transformers.models.clip.modeling_clip.CLIPVisionEmbeddings"


def _has_class_token(module: nn.Module) -> bool:
    """Whether the module holds the class token as one vector (``[D]``), as CLIP's does."""
    token = getattr(module, "class_embedding", None)
    return isinstance(token, nn.Parameter) and token.dim() == 1


@register_layer_rule(CLIP_VISION_EMBEDDINGS, parameters=("class_embedding",), covers=_has_class_token)
def class_token_sums(
    module: nn.Module, calls: Calls, names: Mapping[str, str], sink: GradientSink, ws: Workspace
) -> None:
    """Per-sample gradients of the class token: the output gradient at position 0, summed over calls."""
    total = calls[0][1][:, 0]
    for _, g in calls[1:]:
        total = total + g[:, 0]
    sink.add_per_sample(names["class_embedding"], total)
