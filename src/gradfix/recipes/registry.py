"""The recipe registry: one :class:`RecipeFamily` object per model family, registered by name.

A family knows how to load a model folder and build its :class:`~gradfix.recipes.base.Recipe`
(:meth:`RecipeFamily.build`), which labels a target of that family can score
(:meth:`RecipeFamily.known_labels`) and whether its recipe has class logits to score accuracy
with (:attr:`RecipeFamily.scores_accuracy`).

Adding a recipe is one new file in this folder that defines a :class:`RecipeFamily` subclass
decorated with :func:`register_recipe` (imported by ``gradfix.recipes``), plus its test.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from torch import nn

from gradfix.data import Example, load_examples
from gradfix.errors import ConfigError
from gradfix.recipes.base import Recipe
from gradfix.recipes.placement import Placement
from gradfix.registry import Registry
from gradfix.settings import DEFAULT_MAX_LENGTH

DEFAULT_LOGIT_SCALE = 20.0
"""The zero-shot head's logit scale when neither the caller nor a saved head gives one."""


@dataclass(frozen=True)
class BuildOptions:
    """How a family builds its recipe: the zero-shot head's prompt, source and scale, the token
    limit (``None``: the model folder's, else :data:`~gradfix.settings.DEFAULT_MAX_LENGTH`; see
    :meth:`token_limit`), and the attention implementation passed to ``from_pretrained``
    (``"eager"`` lets ``torch.func.vmap`` batch per-sample gradients; ``None`` keeps the library's
    default), and where the model is loaded (``placement``: its device and dtype; ``None``: float32
    on the CPU; a zero-shot head computed from another folder is always so)."""

    template: str | None = None
    head_from: str | Path | None = None
    max_length: int | None = None
    logit_scale: float | None = None
    attn_implementation: str | None = "eager"
    placement: Placement | None = None

    def token_limit(self, folder_limit: int | None = None) -> int:
        """The effective token limit: ``max_length`` if given, else ``folder_limit`` (what the model
        folder states), else :data:`~gradfix.settings.DEFAULT_MAX_LENGTH`."""
        for limit in (self.max_length, folder_limit):
            if limit is not None:
                return int(limit)
        return DEFAULT_MAX_LENGTH


class RecipeFamily(ABC):
    """A model family and its loss, registered under :attr:`name` with :func:`register_recipe`.

    ``recipe_class`` is the :class:`Recipe` subclass that :meth:`build` returns; whether the family
    scores accuracy follows from it (:attr:`Recipe.scores_accuracy`).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    recipe_class: ClassVar[type[Recipe]]

    @property
    def scores_accuracy(self) -> bool:
        """Whether the family's recipe has class logits, so accuracy can score a model."""
        return bool(self.recipe_class.scores_accuracy)

    @abstractmethod
    def build(
        self, model_dir: str | Path, labels: Sequence[str], options: BuildOptions
    ) -> tuple[nn.Module, Recipe]:
        """Load ``model_dir`` offline (eval mode; float32 on the CPU unless ``options.placement``
        says otherwise) and build ``(model, recipe)`` for it."""

    def read_examples(self, path: str | Path) -> list[Example]:
        """The examples of data file ``path`` in this family's format (default: ``{"text", "label"}``
        JSON lines or CSV/TSV, :func:`gradfix.data.load_examples`); errors name the file and line."""
        return load_examples(path)

    def known_labels(
        self, target: str | Path, head_from: str | Path | None = None
    ) -> tuple[list[str], str] | None:
        """The labels ``target`` can score and whose they are, when it has a fixed set (else ``None``)."""
        return None

    def __call__(
        self, model_dir: str | Path, labels: Sequence[str], **options: Any
    ) -> tuple[nn.Module, Recipe]:
        """:meth:`build` with the options as keywords, so a family can stand where a builder
        function was expected."""
        return self.build(model_dir, labels, BuildOptions(**options))


RECIPES: Registry[RecipeFamily] = Registry("recipe", "known recipes:")
"""The registered recipe families by name, in registration order (the order the CLI lists)."""

F = TypeVar("F", bound=type[RecipeFamily])


def register_recipe(cls: F) -> F:
    """Class decorator: register one instance of a :class:`RecipeFamily` subclass under its ``name``."""
    RECIPES.register(cls.name, cls())
    return cls


def get_recipe(name: str) -> RecipeFamily:
    """The registered recipe family ``name``; a :class:`ConfigError` listing the choices otherwise."""
    return RECIPES.lookup(name)


ZERO_SHOT_RECIPES = ("text-zero-shot", "clip-zero-shot")
"""The recipes with a head of class prompts: the ones that take ``template`` and ``head_from``."""


def reject_zero_shot_options(name: str, options: BuildOptions) -> None:
    """ConfigError if options that only the zero-shot recipes use were given to ``name``."""
    pairs = (("template", options.template), ("head_from", options.head_from))
    given = [opt for opt, value in pairs if value is not None]
    if given:
        users = " and ".join(ZERO_SHOT_RECIPES)
        raise ConfigError(f"{' and '.join(given)}: only {users} use it, not {name}")
