"""The ``causal-lm`` recipe: per-sample mean next-token cross-entropy of a causal language model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from gradfix.data import Example
from gradfix.errors import ConfigError
from gradfix.recipes import _hf
from gradfix.recipes.base import Batch, Recipe
from gradfix.recipes.registry import BuildOptions, RecipeFamily, register_recipe, reject_zero_shot_options


class CausalLMRecipe(Recipe):
    """Per-sample mean next-token cross-entropy of a causal language model on the texts.

    Labels of examples are ignored; ``batch["labels"]`` holds the token ids with ``-100`` at
    padding. There are no class logits, so :meth:`logits` and :meth:`accuracy` raise.
    """

    scores_accuracy = False

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        max_length: int = 128,
        use_prepared_mask: bool | None = None,
    ):
        """Bind the tokenizer (given its end-of-sequence token as padding if it has none)."""
        self.labels = []
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        _hf.ensure_pad_token(tokenizer)
        self.use_prepared_mask = _hf.mask_choice(model, tokenizer, use_prepared_mask, causal=True)

    def collate(self, examples: Sequence[Example]) -> Batch:
        """Tokenise the texts; ``labels`` are the ids with ``-100`` where there is padding."""
        batch = _hf.tokenize(self.tokenizer, [ex.text for ex in examples], self.max_length)
        batch.pop("token_type_ids", None)
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch

    def loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """Mean cross-entropy of each next token over a sample's non-padding tokens, ``[B]``."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        logits = _hf.first_output(_hf.forward(model, inputs, self.use_prepared_mask, causal=True))
        targets = batch["labels"][:, 1:]
        token_losses = F.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none"
        )
        valid = (targets != -100).to(token_losses.dtype)
        return (token_losses * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)

    def logits(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """Not available: a causal LM recipe has no classes."""
        raise ConfigError("the causal-lm recipe has no class logits; evaluate it by its loss")

    def accuracy(self, model: nn.Module, examples: Sequence[Example], batch_size: int = 32) -> float:
        """Not available: a causal LM recipe has no classes."""
        raise ConfigError("the causal-lm recipe has no accuracy; evaluate it by its loss")


@register_recipe
class CausalLM(RecipeFamily):
    """``AutoModelForCausalLM`` + :class:`CausalLMRecipe`; any text is scored, so no label set."""

    name = "causal-lm"
    summary = "a causal language model: mean next-token cross-entropy of the texts"
    recipe_class = CausalLMRecipe

    def build(
        self, model_dir: str | Path, labels: Sequence[str], options: BuildOptions
    ) -> tuple[nn.Module, Recipe]:
        """Load the language model and its tokenizer (``labels`` are not used)."""
        reject_zero_shot_options(self.name, options)
        model, tokenizer = _hf.load_pretrained("AutoModelForCausalLM", model_dir, options.attn_implementation)
        return model, CausalLMRecipe(model, tokenizer, options.max_length)
