"""The ``seq2seq`` recipe: an encoder–decoder (T5-like) scored as closed-vocabulary classification.

Each class name is tokenised as a decoder target, with the tokenizer's own special tokens (T5's
``</s>``), the way a text-to-text classifier is fine-tuned. The per-sample loss is the summed
cross-entropy of the target tokens of the example's own label, ``−log p(label | text)``; the
class logits are the log-likelihoods of every label's token sequence, ``log p(c | text)``, so
the loss is minus the logit of the true class and the arg-max of the logits is the most likely
label (rank classification). Labels of different token lengths are padded with ``-100``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradfix.data import Example
from gradfix.errors import ConfigError
from gradfix.recipes import _hf
from gradfix.recipes.base import Batch, Recipe, model_device
from gradfix.recipes.registry import BuildOptions, RecipeFamily, register_recipe, reject_zero_shot_options

IGNORE = -100
"""Target id of a padding position: no loss (``F.cross_entropy``'s ``ignore_index``)."""


def label_targets(tokenizer: Any, labels: Sequence[str]) -> list[list[int]]:
    """The decoder target ids of each label (special tokens included), in order.

    :class:`ConfigError` for a label that gives no token besides the special ones (the
    tokenizer's normaliser drops all of it) and for two labels with the same tokens (which no
    likelihood could tell apart).
    """
    targets: list[list[int]] = []
    seen: dict[tuple[int, ...], str] = {}
    for label in labels:
        if not tokenizer(label, add_special_tokens=False)["input_ids"]:
            raise ConfigError(f"label {label!r} tokenises to nothing with this model's tokenizer")
        ids = [int(i) for i in tokenizer(label)["input_ids"]]
        if tuple(ids) in seen:
            raise ConfigError(
                f"labels {seen[tuple(ids)]!r} and {label!r} tokenise to the same tokens {ids}; "
                "the model cannot tell them apart"
            )
        seen[tuple(ids)] = label
        targets.append(ids)
    return targets


def padded(rows: Sequence[Sequence[int]], value: int = IGNORE) -> Tensor:
    """``rows`` as one int64 tensor ``[len(rows), longest]``, right-padded with ``value``."""
    width = max(len(row) for row in rows)
    return torch.tensor([[*row, *[value] * (width - len(row))] for row in rows], dtype=torch.int64)


def sequence_log_likelihood(logits: Tensor, targets: Tensor) -> Tensor:
    """``Σ_t log p(target_t | …)`` per row from decoder logits ``[N, L, V]`` and targets ``[N, L]``
    (``-100`` positions count nothing), shape ``[N]``."""
    token_losses = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    return -token_losses.sum(dim=1)


class Seq2SeqRecipe(Recipe):
    """Closed-vocabulary classification with an encoder–decoder language model.

    ``labels`` are the class names in index order, each also the text of its decoder target.
    A batch holds the encoder's ``input_ids`` and ``attention_mask``, each example's own label as
    ``targets`` (``-100``-padded) with the ``decoder_input_ids`` the model makes from them, and
    the class indices as ``labels``. :meth:`loss` decodes only the true label (one decoder pass);
    :meth:`logits` decodes every label (one encoder pass, the decoder on ``B × C`` rows).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        labels: Sequence[str],
        max_length: int = 128,
        use_prepared_mask: bool | None = None,
    ):
        """Tokenise the labels as targets and make the decoder inputs from them.

        ``use_prepared_mask``: pass the padding masks as additive 4D masks (``None``: when a probe
        batch gives the same losses both ways), which lets ``torch.func.vmap`` run the model.
        """
        self.labels = _hf.check_labels(labels)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        _hf.ensure_pad_token(tokenizer)
        _method(model, "get_encoder")
        prepare = _method(model, "prepare_decoder_input_ids_from_labels")
        self.targets = padded(label_targets(tokenizer, self.labels))
        self.decoder_inputs = prepare(labels=self.targets).detach().clone()
        self.lengths = (self.targets != IGNORE).sum(dim=1)
        if use_prepared_mask is None:
            use_prepared_mask = self._supports_prepared_mask(model)
        self.use_prepared_mask = bool(use_prepared_mask)

    def collate(self, examples: Sequence[Example]) -> Batch:
        """Tokenise the texts; add each example's label as class index and as decoder target."""
        batch = _hf.tokenize(self.tokenizer, [ex.text for ex in examples], self.max_length)
        batch.pop("token_type_ids", None)
        labels = _hf.label_indices([ex.label for ex in examples], self.labels)
        width = int(self.lengths[labels].max())
        batch["targets"] = self.targets[labels, :width]
        batch["decoder_input_ids"] = self.decoder_inputs[labels, :width]
        batch["labels"] = labels
        return batch

    def loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """Summed cross-entropy of each example's own target tokens, ``−log p(label | text)``, ``[B]``."""
        logits = self._decode(model, batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
        return -sequence_log_likelihood(logits, batch["targets"])

    def logits(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """``log p(c | text)`` of every class ``c``, shape ``[B, C]`` (the encoder runs once)."""
        device, size = batch["input_ids"].device, batch["input_ids"].shape[0]
        classes = len(self.labels)
        decoder_inputs = self.decoder_inputs.to(device).repeat(size, 1)
        logits = self._decode(model, batch["input_ids"], batch["attention_mask"], decoder_inputs, classes)
        targets = self.targets.to(device).repeat(size, 1)
        return sequence_log_likelihood(logits, targets).view(size, classes)

    def _decode(
        self, model: nn.Module, input_ids: Tensor, mask: Tensor, decoder_input_ids: Tensor, repeat: int = 1
    ) -> Tensor:
        """Decoder logits ``[N, L, V]`` of ``decoder_input_ids`` (``N = B·repeat``): the encoder runs
        once per text and its states are repeated, rows ``b·repeat … b·repeat + repeat − 1`` for text ``b``.

        With :attr:`use_prepared_mask`, the masks are given as additive 4D masks, which
        ``transformers`` uses as they are (it inspects a 2D mask's values, which ``vmap`` cannot).
        """
        encoder_mask = mask
        if self.use_prepared_mask:
            encoder_mask = _hf.prepared_mask(mask, _embedding_dtype(model))
        encoder = _method(model, "get_encoder")()
        hidden = encoder(input_ids=input_ids, attention_mask=encoder_mask).last_hidden_state
        cross_mask = mask
        if repeat > 1:
            hidden, cross_mask = hidden.repeat_interleave(repeat, 0), mask.repeat_interleave(repeat, 0)
        if self.use_prepared_mask:
            cross_mask = cross_attention_mask(cross_mask, decoder_input_ids.shape[1], hidden.dtype)
        outputs = model(
            encoder_outputs=(hidden,),
            attention_mask=cross_mask,
            decoder_input_ids=decoder_input_ids,
            use_cache=False,
        )
        return outputs.logits

    @torch.no_grad()
    def _supports_prepared_mask(self, model: nn.Module) -> bool:
        """Whether the losses of a padded probe batch are the same with 4D masks as with 2D ones."""
        label = self.labels[0]
        batch = self.collate([Example("a", label), Example("a a a a a", label)])
        batch = {key: value.to(model_device(model)) for key, value in batch.items()}
        was_training = model.training
        model.eval()
        try:
            self.use_prepared_mask = False
            reference = self.loss(model, batch)
            self.use_prepared_mask = True
            prepared = self.loss(model, batch)
        except Exception:  # any failure means the model does not take 4D masks
            return False
        finally:
            model.train(was_training)
        return bool(torch.allclose(reference, prepared, atol=1e-4, rtol=1e-4))


def cross_attention_mask(mask: Tensor, queries: int, dtype: torch.dtype) -> Tensor:
    """Additive mask ``[B, 1, queries, T]`` (0 = attend, dtype min = padding) from a 2D padding mask."""
    keep = mask.to(torch.bool)[:, None, None, :].expand(-1, 1, queries, -1)
    return (~keep).to(dtype) * torch.finfo(dtype).min


def _embedding_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's input embedding (the dtype its attention scores are in)."""
    weight = getattr(_method(model, "get_input_embeddings")(), "weight", None)
    return weight.dtype if isinstance(weight, Tensor) else torch.float32


def _method(model: nn.Module, name: str) -> Callable[..., Any]:
    """``model.<name>``, which every encoder–decoder language model of ``transformers`` has."""
    method = getattr(model, name, None)
    if not callable(method):
        raise ConfigError(
            f"{type(model).__name__} has no {name}(); the seq2seq recipe needs an encoder-decoder "
            "language model"
        )
    return method


@register_recipe
class Seq2Seq(RecipeFamily):
    """``AutoModelForSeq2SeqLM`` + :class:`Seq2SeqRecipe`: the labels are the decoder's targets."""

    name = "seq2seq"
    summary = "an encoder-decoder (T5-like) classifier: cross-entropy of the label words as decoder targets"
    recipe_class = Seq2SeqRecipe

    def build(
        self, model_dir: str | Path, labels: Sequence[str], options: BuildOptions
    ) -> tuple[nn.Module, Recipe]:
        """Load the encoder–decoder and its tokenizer; ``template`` and ``head_from`` are refused."""
        reject_zero_shot_options(self.name, options)
        model, tokenizer = _hf.load_pretrained(
            "AutoModelForSeq2SeqLM", model_dir, options.attn_implementation, options.placement
        )
        try:
            recipe = Seq2SeqRecipe(model, tokenizer, labels, options.token_limit())
        except ConfigError as exc:  # a label the folder's tokenizer cannot target
            raise ConfigError(f"{model_dir}: {exc}") from exc
        return model, recipe
