"""Recipe for a plain ``nn.Module`` trained with a per-sample loss on ``(inputs, labels)``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradfix.errors import ConfigError, DataError
from gradfix.recipes.base import Batch, Recipe

LossFn = Callable[[Tensor, Tensor], Tensor]


def _cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Unreduced cross-entropy; outputs ``[B, C, ...]`` against class indices ``[B, ...]``."""
    return F.cross_entropy(outputs, targets.long(), reduction="none")


def _mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """Unreduced squared error between outputs and targets of the same shape."""
    return F.mse_loss(outputs, targets.to(outputs.dtype), reduction="none")


_BUILTIN_LOSSES: dict[str, LossFn] = {"cross_entropy": _cross_entropy, "mse": _mse}


class ModuleRecipe(Recipe):
    """Per-sample loss of ``model(batch["inputs"])`` against ``batch["labels"]``.

    ``loss`` is ``"cross_entropy"`` (class indices as labels), ``"mse"`` (targets shaped like the
    outputs) or a callable ``(outputs, targets) -> losses`` that does no reduction over the batch:
    it must return shape ``[B]`` or ``[B, ...]``. Losses with extra dimensions are averaged over
    them, per sample. ``labels`` optionally names the classes (output columns) in index order.
    """

    def __init__(self, loss: str | LossFn = "cross_entropy", labels: Sequence[str] | None = None):
        """Pick the loss by name or pass a per-sample callable."""
        if isinstance(loss, str):
            if loss not in _BUILTIN_LOSSES:
                known = ", ".join(sorted(_BUILTIN_LOSSES))
                raise ConfigError(f"unknown loss {loss!r}; use one of {known} or a callable")
            self.loss_name = loss
            self.loss_fn: LossFn = _BUILTIN_LOSSES[loss]
        elif callable(loss):
            self.loss_name = getattr(loss, "__name__", type(loss).__name__)
            self.loss_fn = loss
        else:
            raise ConfigError(f"loss must be a name or a callable, got {type(loss).__name__}")
        self.labels = list(labels) if labels is not None else []

    def logits(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """The model's outputs on ``batch["inputs"]``."""
        return model(batch["inputs"])

    def loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """Per-sample loss, shape ``[B]`` (extra loss dimensions averaged per sample)."""
        outputs = model(batch["inputs"])
        losses = self.loss_fn(outputs, batch["labels"])
        return self._per_sample(losses, batch["inputs"].shape[0])

    def _per_sample(self, losses: Any, size: int) -> Tensor:
        """Check a loss tensor has the batch axis first and reduce it to ``[B]``."""
        if not isinstance(losses, Tensor):
            raise ConfigError(f"loss {self.loss_name!r} returned {type(losses).__name__}, expected a tensor")
        if losses.dim() == 0:
            raise ConfigError(
                f"loss {self.loss_name!r} returned a scalar; it must return one loss per sample "
                "(shape [batch]), i.e. use reduction='none'"
            )
        if losses.shape[0] != size:
            raise ConfigError(
                f"loss {self.loss_name!r} returned shape {list(losses.shape)} for a batch of "
                f"{size}; the first dimension must be the batch (use reduction='none')"
            )
        if losses.dim() > 1:
            losses = losses.reshape(size, -1).mean(dim=1)
        return losses

    def collate(self, examples: Sequence[Any]) -> Batch:
        """Stack ``(input, target)`` pairs into ``{"inputs": [B, ...], "labels": [B, ...]}``."""
        if len(examples) == 0:
            raise DataError("cannot collate an empty list of examples")
        inputs, targets = [], []
        for position, item in enumerate(examples, start=1):
            try:
                x, y = item
            except (TypeError, ValueError) as exc:
                raise DataError(
                    f"example {position}: expected an (input, target) pair, got {type(item).__name__}"
                ) from exc
            inputs.append(torch.as_tensor(x))
            targets.append(torch.as_tensor(y))
        try:
            return {"inputs": torch.stack(inputs), "labels": torch.stack(targets)}
        except RuntimeError as exc:
            raise DataError(f"examples have inconsistent shapes: {exc}") from exc
