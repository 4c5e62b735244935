"""Recipes: how a model and labelled examples become per-sample losses, and a registry of them.

Each model family lives in its own file as a :class:`RecipeFamily` registered by name in
:data:`RECIPES` (:mod:`gradfix.recipes.registry`). ``load_recipe(name, model_dir, labels)`` loads
a Hugging Face model folder offline and builds the recipe registered under ``name``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from torch import nn

from gradfix.recipes.base import Recipe, per_sample_cross_entropy
from gradfix.recipes.module import ModuleRecipe
from gradfix.recipes.placement import Placement, resolve_placement
from gradfix.recipes.registry import (
    DEFAULT_LOGIT_SCALE,
    RECIPES,
    BuildOptions,
    RecipeFamily,
    get_recipe,
    register_recipe,
)

# the families, in the order the command line lists them (importing a file registers its recipe)
from gradfix.recipes.text_zero_shot import (  # isort: skip
    DEFAULT_TEMPLATE,
    HEAD_FILENAME,
    TextZeroShotRecipe,
    mean_pool,
)
from gradfix.recipes.sequence_classification import SequenceClassificationRecipe  # isort: skip
from gradfix.recipes.causal_lm import CausalLMRecipe  # isort: skip
from gradfix.recipes.clip_zero_shot import ClipZeroShotRecipe  # isort: skip
from gradfix.recipes.seq2seq import Seq2SeqRecipe  # isort: skip

__all__ = [
    "DEFAULT_LOGIT_SCALE",
    "DEFAULT_TEMPLATE",
    "HEAD_FILENAME",
    "RECIPES",
    "BuildOptions",
    "CausalLMRecipe",
    "ClipZeroShotRecipe",
    "ModuleRecipe",
    "Placement",
    "Recipe",
    "RecipeBuilder",
    "RecipeFamily",
    "Seq2SeqRecipe",
    "SequenceClassificationRecipe",
    "TextZeroShotRecipe",
    "get_recipe",
    "load_recipe",
    "mean_pool",
    "per_sample_cross_entropy",
    "register_recipe",
    "resolve_placement",
]

RecipeBuilder = Callable[..., tuple[nn.Module, Recipe]]
"""``builder(model_dir, labels, *, template, head_from, max_length, logit_scale,
attn_implementation, placement) -> (model, recipe)``: what :meth:`RecipeFamily.build` is."""


def load_recipe(
    name: str,
    model_dir: str | Path,
    labels: Sequence[str],
    *,
    template: str | None = None,
    head_from: str | Path | None = None,
    max_length: int | None = None,
    logit_scale: float | None = None,
    attn_implementation: str | None = "eager",
    placement: Placement | None = None,
) -> tuple[nn.Module, Recipe]:
    """Load a model folder offline (eval mode) and build the recipe ``name`` for it.

    The model is loaded in float32 on the CPU unless ``placement`` names another device and dtype
    (:func:`gradfix.recipes.placement.resolve_placement`).

    For ``"text-zero-shot"`` the head comes from ``head_from``: a saved head file, or a model
    folder (its ``zero_shot_head.safetensors`` if it has one, else its own prompt embeddings).
    By default it is ``model_dir``'s ``zero_shot_head.safetensors`` if present, else the prompts
    embedded by the loaded model. ``template`` defaults to :data:`DEFAULT_TEMPLATE`;
    ``logit_scale`` to the head file's scale, else 20. ``"clip-zero-shot"`` takes the same three
    options (its scale defaults to the model's own); other recipes refuse ``template`` and
    ``head_from`` and ignore ``logit_scale``. Raises
    :class:`ConfigError` for an unknown name. ``attn_implementation`` goes to ``from_pretrained``;
    the default ``"eager"`` lets ``torch.func.vmap`` batch per-sample gradients (``None`` keeps
    the library's default, e.g. SDPA). ``max_length`` ``None`` takes the model folder's token limit
    (a sentence-transformers ``max_seq_length``), else :data:`~gradfix.settings.DEFAULT_MAX_LENGTH`.
    """
    options = BuildOptions(template, head_from, max_length, logit_scale, attn_implementation, placement)
    return get_recipe(name).build(model_dir, labels, options)
