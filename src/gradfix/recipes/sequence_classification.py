"""The ``sequence-classification`` recipe: per-sample cross-entropy of a classifier's logits."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from gradfix.data import Example
from gradfix.errors import ConfigError
from gradfix.recipes import _hf
from gradfix.recipes.base import Batch, Recipe
from gradfix.recipes.registry import BuildOptions, RecipeFamily, register_recipe, reject_zero_shot_options

_GENERIC_LABEL = re.compile(r"^LABEL_\d+$")


class SequenceClassificationRecipe(Recipe):
    """Per-sample cross-entropy of a sequence classifier's ``logits``.

    Class order: the model's ``config.label2id`` when its names are exactly ``labels``, otherwise
    ``labels`` sorted. :class:`ConfigError` if the model's ``num_labels`` differs from the count.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        labels: Sequence[str],
        max_length: int = 128,
        use_prepared_mask: bool | None = None,
    ):
        """Bind the tokenizer and fix the label order from the model's config."""
        names = _hf.check_labels(labels)
        config = getattr(model, "config", None)
        num_labels = getattr(config, "num_labels", None)
        if num_labels is not None and num_labels != len(names):
            raise ConfigError(
                f"the model classifies into {num_labels} labels but {len(names)} were given: {names}"
            )
        label2id = dict(getattr(config, "label2id", None) or {})
        if set(label2id) == set(names) and sorted(label2id.values()) == list(range(len(names))):
            self.labels = sorted(names, key=lambda name: label2id[name])
        else:
            self.labels = sorted(names)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        _hf.ensure_pad_token(tokenizer)
        self.use_prepared_mask = _hf.mask_choice(model, tokenizer, use_prepared_mask, causal=False)

    def logits(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """The classifier's logits ``[B, C]``."""
        return _hf.first_output(_hf.forward(model, batch, self.use_prepared_mask))

    def collate(self, examples: Sequence[Example]) -> Batch:
        """Tokenise the texts and add ``labels`` as int64 indices into :attr:`labels`."""
        batch = _hf.tokenize(self.tokenizer, [ex.text for ex in examples], self.max_length)
        batch["labels"] = _hf.label_indices([ex.label for ex in examples], self.labels)
        return batch


@register_recipe
class SequenceClassification(RecipeFamily):
    """``AutoModelForSequenceClassification`` + :class:`SequenceClassificationRecipe`."""

    name = "sequence-classification"
    summary = "a fine-tuned text classifier: cross-entropy of its logits"
    recipe_class = SequenceClassificationRecipe

    def build(
        self, model_dir: str | Path, labels: Sequence[str], options: BuildOptions
    ) -> tuple[nn.Module, Recipe]:
        """Load the classifier and its tokenizer; ``template`` and ``head_from`` are refused."""
        reject_zero_shot_options(self.name, options)
        model, tokenizer = _hf.load_pretrained(
            "AutoModelForSequenceClassification", model_dir, options.attn_implementation, options.placement
        )
        return model, SequenceClassificationRecipe(model, tokenizer, labels, options.token_limit())

    def known_labels(
        self, target: str | Path, head_from: str | Path | None = None
    ) -> tuple[list[str], str] | None:
        """The names in ``config.json``'s ``id2label``, unless they are ``LABEL_0``, ``LABEL_1``, ..."""
        config = Path(target) / "config.json"
        try:
            id2label = json.loads(config.read_text(encoding="utf-8")).get("id2label")
        except (OSError, ValueError, AttributeError):
            return None
        if not isinstance(id2label, dict) or not id2label:
            return None
        names = [str(v) for v in id2label.values()]
        if all(_GENERIC_LABEL.match(n) for n in names):
            return None
        return names, f"the id2label of {config}"
