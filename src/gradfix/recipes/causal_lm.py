"""The ``causal-lm`` recipe: per-sample mean next-token cross-entropy of a causal language model.

Data follow TRL's conventions (:mod:`gradfix.recipes._lm_data`): ``{"text"}`` scores every
token, ``{"prompt", "completion"}`` the completion's tokens, ``{"messages"}`` the assistant
turns rendered by the tokenizer's chat template. No label is needed (one is ignored), so
``shots`` draws that many examples in all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradfix.data import Example
from gradfix.errors import ConfigError, DataError
from gradfix.recipes import _hf, _lm_data
from gradfix.recipes.base import Batch, Recipe
from gradfix.recipes.registry import BuildOptions, RecipeFamily, register_recipe, reject_zero_shot_options


class CausalLMRecipe(Recipe):
    """Per-sample mean next-token cross-entropy of a causal language model over the scored tokens.

    Labels of examples are ignored; ``batch["labels"]`` holds the token ids with ``-100`` at
    padding and at tokens that are not scored (a prompt, the turns other than the assistant's).
    Texts are cut to ``max_length`` tokens at the end; an example with no scored token left is a
    :class:`DataError`. There are no class logits, so :meth:`logits` and :meth:`accuracy` raise.
    """

    scores_accuracy = False

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        max_length: int | None = None,
        use_prepared_mask: bool | None = None,
    ):
        """Bind the tokenizer (given its end-of-sequence token as padding if it has none)."""
        self.labels = []
        self.tokenizer = tokenizer
        self.max_length = BuildOptions(max_length=max_length).token_limit()
        _hf.ensure_pad_token(tokenizer)
        self.use_prepared_mask = _hf.mask_choice(model, tokenizer, use_prepared_mask, causal=True)

    def collate(self, examples: Sequence[Example]) -> Batch:
        """Tokenise the examples, right-padded; ``labels`` are the ids with ``-100`` at padding and
        at the tokens that are not scored."""
        if len(examples) == 0:
            raise DataError("cannot collate an empty list of examples")
        rows = [self.encode(ex, position) for position, ex in enumerate(examples, start=1)]
        width = max(len(ids) for ids, _ in rows)
        pad = int(self.tokenizer.pad_token_id)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.int64)
        attention = torch.zeros((len(rows), width), dtype=torch.int64)
        labels = torch.full((len(rows), width), -100, dtype=torch.int64)
        for i, (ids, scored) in enumerate(rows):
            row = torch.tensor(ids, dtype=torch.int64)
            input_ids[i, : len(ids)] = row
            attention[i, : len(ids)] = 1
            labels[i, : len(ids)] = row.masked_fill(~torch.tensor(scored, dtype=torch.bool), -100)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

    def encode(self, example: Example, position: int = 1) -> tuple[list[int], list[bool]]:
        """The token ids of one example (at most :attr:`max_length`) and whether each is scored.

        ``position`` (1-based, in its batch) names an example that was not read from a file.
        """
        at = _lm_data.where(example, position)
        messages = example.get("messages")
        if messages is None and example.get("completion") is None:
            encoded = self.tokenizer(example.text, truncation=True, max_length=self.max_length)
            return list(encoded["input_ids"]), [True] * len(encoded["input_ids"])
        if messages is not None:
            text, spans = _lm_data.chat_text(self.tokenizer, messages, example.get("scored", ()), at)
            what, special = "scored turn's", False  # the rendered template holds its special tokens
        else:
            text = example.get("prompt", "") + example.get("completion")
            spans, what, special = [(len(example.get("prompt", "")), len(text))], "completion", True
        if not getattr(self.tokenizer, "is_fast", False):
            raise ConfigError("the causal-lm recipe needs a fast tokenizer (character offsets) for this data")
        encoded = self.tokenizer(
            text,
            truncation=True,
            max_length=self.max_length,
            add_special_tokens=special,
            return_offsets_mapping=True,
        )
        scored = _lm_data.scored_tokens(encoded["offset_mapping"], spans)
        if not any(scored[1:]):  # the first token is never a target
            raise DataError(
                f"{at}: no {what} token is left within the first {self.max_length} tokens; "
                "give a larger --max-length or a shorter example"
            )
        return list(encoded["input_ids"]), scored

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
    """``AutoModelForCausalLM`` + :class:`CausalLMRecipe`; any text is scored, so no label set.

    Its data are JSON lines (or CSV/TSV) in TRL's formats, read by :meth:`read_examples`; every
    example is :data:`~gradfix.data.UNLABELLED`.
    """

    name = "causal-lm"
    summary = (
        "a causal language model: mean next-token cross-entropy of {text}, of a completion after "
        "its {prompt}, or of the assistant turns of {messages}"
    )
    recipe_class = CausalLMRecipe

    def read_examples(self, path: str | Path) -> list[Example]:
        """The examples of a ``{"text"}``, ``{"prompt", "completion"}`` or ``{"messages"}`` file,
        all unlabelled (a ``label`` is ignored); errors name the file and line."""
        return _lm_data.read_lm_examples(path)

    def build(
        self, model_dir: str | Path, labels: Sequence[str], options: BuildOptions
    ) -> tuple[nn.Module, Recipe]:
        """Load the language model and its tokenizer (``labels`` are not used)."""
        reject_zero_shot_options(self.name, options)
        model, tokenizer = _hf.load_pretrained(
            "AutoModelForCausalLM", model_dir, options.attn_implementation, options.placement
        )
        return model, CausalLMRecipe(model, tokenizer, options.token_limit())
