"""The evaluation job: accuracy of a model folder on a labelled data file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradfix.data import check_known_labels, label_set
from gradfix.io.hub import resolve_models
from gradfix.recipes import BuildOptions, get_recipe


def evaluate_model(
    model_dir: str | Path,
    data: str | Path,
    recipe_name: str = "text-zero-shot",
    *,
    template: str | None = None,
    head_from: str | Path | None = None,
    batch_size: int = 32,
    max_length: int | None = None,
    revision: str | None = None,
) -> dict[str, Any]:
    """Accuracy of a model folder on a labelled data file with a recipe.

    For ``text-zero-shot`` the zero-shot head comes from ``head_from`` (a head file or a model
    folder), else from ``zero_shot_head.safetensors`` in the folder (written by transport: the
    target base's own head), else from the model itself. A label of ``data`` that the head (or a
    classifier's named labels) does not know is an error naming the data file and line; an
    unknown recipe is a :class:`ConfigError` listing the known ones. ``model_dir`` and
    ``head_from`` may be Hugging Face Hub ids, at ``revision`` (:func:`gradfix.io.hub.resolve_model`).
    ``max_length`` ``None`` takes the model folder's token limit (see
    :class:`~gradfix.recipes.BuildOptions`); the result holds the effective one.
    """
    model_dir, *head = resolve_models([model_dir, *([head_from] if head_from is not None else [])], revision)
    head_from = head[0] if head else None
    family = get_recipe(recipe_name)
    examples = family.read_examples(data)
    labels = label_set(examples)
    known = family.known_labels(model_dir, head_from)
    if known is not None:
        check_known_labels(examples, known[0], data, known[1])
    options = BuildOptions(template=template, head_from=head_from, max_length=max_length)
    model, recipe = family.build(model_dir, labels, options)
    accuracy = recipe.accuracy(model, examples, batch_size=batch_size)
    return {
        "model": str(model_dir),
        "data": str(data),
        "recipe": recipe_name,
        "examples": len(examples),
        "accuracy": accuracy,
        "max_length": getattr(recipe, "max_length", None),
    }
