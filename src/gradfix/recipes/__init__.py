"""Recipes: how a model and labelled examples become per-sample losses, and a registry of them.

``load_recipe(name, model_dir, labels)`` loads a Hugging Face model folder offline and builds the
recipe registered under ``name`` in :data:`RECIPES`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from torch import nn

from gradfix.errors import CheckpointError, ConfigError
from gradfix.recipes._hf import load_pretrained
from gradfix.recipes.base import Recipe, per_sample_cross_entropy
from gradfix.recipes.module import ModuleRecipe
from gradfix.recipes.text import (
    DEFAULT_TEMPLATE,
    HEAD_FILENAME,
    CausalLMRecipe,
    SequenceClassificationRecipe,
    TextZeroShotRecipe,
    mean_pool,
)

__all__ = [
    "DEFAULT_TEMPLATE",
    "HEAD_FILENAME",
    "RECIPES",
    "CausalLMRecipe",
    "ModuleRecipe",
    "Recipe",
    "RecipeBuilder",
    "SequenceClassificationRecipe",
    "TextZeroShotRecipe",
    "load_recipe",
    "mean_pool",
    "per_sample_cross_entropy",
]

RecipeBuilder = Callable[..., tuple[nn.Module, Recipe]]
"""``builder(model_dir, labels, *, template, head_from, max_length, logit_scale,
attn_implementation) -> (model, recipe)``."""

DEFAULT_LOGIT_SCALE = 20.0


def _head_source(model_dir: Path, head_from: str | Path | None) -> Path | None:
    """The head file or model folder the zero-shot head comes from (``None``: the model itself)."""
    if head_from is None:
        own = model_dir / HEAD_FILENAME
        return own if own.is_file() else None
    source = Path(head_from)
    if source.is_file():
        return source
    if source.is_dir():
        if (source / HEAD_FILENAME).is_file():
            return source / HEAD_FILENAME
        return None if source.resolve() == model_dir.resolve() else source
    raise CheckpointError(f"{source}: head_from is neither a zero-shot head file nor a model folder")


def _build_text_zero_shot(
    model_dir: str | Path,
    labels: Sequence[str],
    *,
    template: str | None = None,
    head_from: str | Path | None = None,
    max_length: int = 128,
    logit_scale: float | None = None,
    attn_implementation: str | None = "eager",
) -> tuple[nn.Module, Recipe]:
    """``AutoModel`` + :class:`TextZeroShotRecipe` with the head resolved as in :func:`load_recipe`."""
    folder = Path(model_dir)
    model, tokenizer = load_pretrained("AutoModel", folder, attn_implementation)
    source = _head_source(folder, head_from)
    scale = DEFAULT_LOGIT_SCALE if logit_scale is None else logit_scale
    if source is not None and source.is_file():
        recipe = TextZeroShotRecipe.from_head_file(
            model, tokenizer, source, labels, logit_scale=logit_scale, max_length=max_length
        )
        if template is not None and template != recipe.template:
            raise ConfigError(
                f"{source}: the zero-shot head was built with template {recipe.template!r}, "
                f"not {template!r}; omit the template or rebuild the head"
            )
        return model, recipe
    prompt = DEFAULT_TEMPLATE if template is None else template
    head = None
    if source is not None:
        head_model, head_tokenizer = load_pretrained("AutoModel", source, attn_implementation)
        head = TextZeroShotRecipe(
            head_model, head_tokenizer, labels, prompt, scale, max_length
        ).head
    recipe = TextZeroShotRecipe(model, tokenizer, labels, prompt, scale, max_length, head=head)
    return model, recipe


def _reject_zero_shot_options(name: str, template: object, head_from: object) -> None:
    """ConfigError if options that only the zero-shot recipe uses were given to ``name``."""
    options = (("template", template), ("head_from", head_from))
    given = [opt for opt, value in options if value is not None]
    if given:
        raise ConfigError(f"{' and '.join(given)}: only text-zero-shot uses it, not {name}")


def _build_sequence_classification(
    model_dir: str | Path,
    labels: Sequence[str],
    *,
    template: str | None = None,
    head_from: str | Path | None = None,
    max_length: int = 128,
    logit_scale: float | None = None,
    attn_implementation: str | None = "eager",
) -> tuple[nn.Module, Recipe]:
    """``AutoModelForSequenceClassification`` + :class:`SequenceClassificationRecipe`."""
    _reject_zero_shot_options("sequence-classification", template, head_from)
    model, tokenizer = load_pretrained(
        "AutoModelForSequenceClassification", model_dir, attn_implementation
    )
    return model, SequenceClassificationRecipe(model, tokenizer, labels, max_length)


def _build_causal_lm(
    model_dir: str | Path,
    labels: Sequence[str],
    *,
    template: str | None = None,
    head_from: str | Path | None = None,
    max_length: int = 128,
    logit_scale: float | None = None,
    attn_implementation: str | None = "eager",
) -> tuple[nn.Module, Recipe]:
    """``AutoModelForCausalLM`` + :class:`CausalLMRecipe` (``labels`` are not used)."""
    _reject_zero_shot_options("causal-lm", template, head_from)
    model, tokenizer = load_pretrained("AutoModelForCausalLM", model_dir, attn_implementation)
    return model, CausalLMRecipe(model, tokenizer, max_length)


RECIPES: dict[str, RecipeBuilder] = {
    "text-zero-shot": _build_text_zero_shot,
    "sequence-classification": _build_sequence_classification,
    "causal-lm": _build_causal_lm,
}


def load_recipe(
    name: str,
    model_dir: str | Path,
    labels: Sequence[str],
    *,
    template: str | None = None,
    head_from: str | Path | None = None,
    max_length: int = 128,
    logit_scale: float | None = None,
    attn_implementation: str | None = "eager",
) -> tuple[nn.Module, Recipe]:
    """Load a model folder offline (float32, eval mode) and build the recipe ``name`` for it.

    For ``"text-zero-shot"`` the head comes from ``head_from``: a saved head file, or a model
    folder (its ``zero_shot_head.safetensors`` if it has one, else its own prompt embeddings).
    By default it is ``model_dir``'s ``zero_shot_head.safetensors`` if present, else the prompts
    embedded by the loaded model. ``template`` defaults to :data:`DEFAULT_TEMPLATE`;
    ``logit_scale`` to the head file's scale, else 20. ``template`` and ``head_from`` are for
    ``"text-zero-shot"`` only (other recipes ignore ``logit_scale``). Raises
    :class:`ConfigError` for an unknown name. ``attn_implementation`` goes to ``from_pretrained``;
    the default ``"eager"`` lets ``torch.func.vmap`` batch per-sample gradients (``None`` keeps
    the library's default, e.g. SDPA).
    """
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    return RECIPES[name](
        model_dir,
        labels,
        template=template,
        head_from=head_from,
        max_length=max_length,
        logit_scale=logit_scale,
        attn_implementation=attn_implementation,
    )
