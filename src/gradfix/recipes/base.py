"""The recipe interface: how a model and a batch of examples become per-sample losses.

A recipe's :meth:`Recipe.loss` must be a pure function of ``(model, batch)``: it may not mutate
the model or keep state between calls, because it is evaluated on whole batches, on one-sample
slices ``{k: v[i:i+1]}`` and under ``torch.func.functional_call``/``vmap``. A batch is a dict of
tensors whose first dimension is the sample axis.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradfix.data import Example, batched
from gradfix.errors import DataError

Batch = dict[str, Tensor]


def per_sample_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of each sample, shape ``[B]``, from class logits ``[B, C]`` and indices ``[B]``."""
    return F.cross_entropy(logits, targets.long(), reduction="none")


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a model without tensors)."""
    for parameter in model.parameters():
        return parameter.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def batch_to(batch: Mapping[str, Tensor], device: torch.device | str) -> Batch:
    """A copy of ``batch`` with every tensor moved to ``device``."""
    return {key: value.to(device) for key, value in batch.items()}


def place_batch(batch: Mapping[str, Tensor], model: nn.Module) -> Batch:
    """``batch`` where ``model`` computes: every tensor on the device of its first floating
    parameter, floating tensors (pixels) in that parameter's dtype. The same tensors for a float32
    model on the CPU; a model spread over devices gets its inputs on its first one."""
    for param in model.parameters():
        if param.is_floating_point():
            device, dtype = param.device, param.dtype
            break
    else:
        return dict(batch)
    return {
        key: value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
        for key, value in batch.items()
    }


class Recipe(ABC):
    """Turns ``(model, batch)`` into per-sample losses ``[B]`` and class logits ``[B, C]``.

    Subclasses implement :meth:`collate` and :meth:`logits`; the default :meth:`loss` is the
    per-sample cross-entropy of the logits against ``batch["labels"]``. ``labels`` lists the class
    names in index order. ``scores_accuracy`` is false for a recipe without class logits (its
    :meth:`logits` and :meth:`accuracy` raise).
    """

    labels: list[str]
    scores_accuracy: ClassVar[bool] = True

    def loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """Per-sample loss, shape ``[B]``. Pure in ``(model, batch)``; never mutates ``model``."""
        return per_sample_cross_entropy(self.logits(model, batch), batch["labels"])

    def __call__(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """Same as :meth:`loss`, so a recipe can be passed wherever ``loss_fn`` is expected."""
        return self.loss(model, batch)

    @abstractmethod
    def logits(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """Class logits, shape ``[B, C]``, with columns in the order of :attr:`labels`."""

    @abstractmethod
    def collate(self, examples: Sequence[Any]) -> Batch:
        """Turn examples into a batch dict (sample axis first) that includes ``"labels"``."""

    @torch.no_grad()
    def accuracy(self, model: nn.Module, examples: Sequence[Example], batch_size: int = 32) -> float:
        """Fraction of ``examples`` whose arg-max logit is the true class (eval mode, no grad).

        The model's train/eval mode is restored afterwards. Batches are moved to the device (and
        floating inputs to the dtype) of the model's parameters (:func:`place_batch`).
        """
        if len(examples) == 0:
            raise DataError("accuracy needs at least one example, got none")
        was_training = model.training
        model.eval()
        correct = 0
        try:
            for chunk in batched(examples, batch_size):
                batch = place_batch(self.collate(chunk), model)
                predicted = self.logits(model, batch).argmax(dim=-1)
                correct += int((predicted == batch["labels"]).sum())
        finally:
            model.train(was_training)
        return correct / len(examples)
