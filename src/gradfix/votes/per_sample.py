"""Per-sample gradients, delivered one tensor at a time to a consumer (the vote counter).

Three engines, all exact (they compute the same per-sample gradients, up to float rounding, as
one backward pass per sample):

- ``hooks`` (:mod:`gradfix.votes.hooks`): one batched forward and one backward to the
  *outputs* of the modules that have a per-layer rule (``nn.Linear``, ``nn.LayerNorm``,
  ``nn.Embedding``: :mod:`gradfix.votes.layers`); each per-sample weight gradient is formed from
  that module's inputs and output gradients during the backward, module by module, so per-sample
  gradients of the whole model are never held at once. Parameters of other modules (or shared
  between modules) fall back to the loop;
- ``vmap``: ``torch.func.vmap(grad)`` over chunks of samples;
- ``loop``: one backward pass per sample.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from gradfix.errors import GradfixError

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> per-sample losses`` of shape ``[batch]``."""


class GradientSink(Protocol):
    """Receives per-sample gradients: dense ``[b, *shape]``, per-sample embedding rows, or a linear
    layer's inputs and output gradients.

    ``grads`` may live in scratch memory that is overwritten after the call: a sink reduces them
    (or copies them) and keeps no reference.
    """

    def add_per_sample(self, name: str, grads: Tensor) -> None: ...

    def add_rows(self, name: str, rows: Tensor, grads: Tensor, samples: Tensor) -> None:
        """Gradients of an embedding's used rows: entry ``k`` is row ``rows[k]`` of sample ``samples[k]``."""
        ...

    def add_linear(self, name: str, x: Tensor, grad_out: Tensor) -> bool:
        """Take a linear weight's per-sample gradients as ``δ_bᵀ x_b`` from ``x`` ``[b, tokens, in]``
        and ``grad_out`` ``[b, tokens, out]``; False if the sink cannot (they are then formed and
        passed to :meth:`add_per_sample`)."""
        ...


class Workspace:
    """Scratch memory reused across layers and batches.

    Per-sample products of a linear layer, when the sink does not form them itself (no C kernel,
    other dtypes), are written into it a chunk of samples at a time (about ``chunk_bytes``), so
    they stay in cache and no large tensor is allocated (and page-faulted) per layer.
    """

    def __init__(self, chunk_bytes: int = 4 * 2**20):
        self.chunk_bytes = chunk_bytes
        self._buffer: Tensor | None = None

    def take(self, numel: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
        """A flat scratch tensor of at least ``numel`` values (its content is undefined)."""
        buf = self._buffer
        if buf is None or buf.dtype != dtype or buf.device != torch.device(device) or buf.numel() < numel:
            buf = self._buffer = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]


# -- batches ------------------------------------------------------------------------------------
def batch_size(batch: Any) -> int:
    """Number of samples in a batch: the first dimension of its first tensor."""
    for leaf in _leaves(batch):
        if isinstance(leaf, Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    raise GradfixError("a batch must hold at least one tensor with a sample axis first")


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of a batch (a tensor, or a dict/list/tuple of tensors and lists)."""
    if isinstance(batch, Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return {k: slice_batch(v, start, stop) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        if batch and all(isinstance(x, (Tensor, Mapping, list, tuple)) for x in batch):
            return type(batch)(slice_batch(x, start, stop) for x in batch)
        return batch[start:stop]
    return batch


def _leaves(batch: Any) -> Iterator[Any]:
    if isinstance(batch, Mapping):
        for v in batch.values():
            yield from _leaves(v)
    elif isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], (Tensor, Mapping)):
        for v in batch:
            yield from _leaves(v)
    else:
        yield batch


def check_losses(losses: Tensor, expected: int) -> Tensor:
    """Raise unless ``losses`` has shape ``[expected]`` (per-sample losses)."""
    if not isinstance(losses, Tensor) or losses.dim() != 1 or losses.shape[0] != expected:
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise GradfixError(
            f"loss_fn must return per-sample losses of shape [{expected}], got {shape} (use reduction='none')"
        )
    return losses


# -- loop ---------------------------------------------------------------------------------------
def loop_gradients(
    model: nn.Module, params: Mapping[str, Tensor], batch: Any, loss_fn: LossFn, sink: GradientSink
) -> None:
    """One backward pass per sample of ``batch`` (none for a sample whose loss none of ``params`` enter)."""
    names = list(params)
    for i in range(batch_size(batch)):
        loss = check_losses(loss_fn(model, slice_batch(batch, i, i + 1)), 1).sum()
        if not loss.requires_grad:  # e.g. parameters the loss does not use: no gradient, no vote
            continue
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        for name, g in zip(names, grads, strict=True):
            if g is not None:
                sink.add_per_sample(name, g.unsqueeze(0))


# -- vmap ---------------------------------------------------------------------------------------
class _LossModule(nn.Module):
    """Wraps ``loss_fn`` so that ``torch.func.functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


def vmap_gradients(
    model: nn.Module, params: Mapping[str, Tensor], chunk: Any, loss_fn: LossFn, sink: GradientSink
) -> None:
    """``torch.func.vmap(grad)`` over the samples of ``chunk``."""
    from torch.func import functional_call, grad, vmap
    from torch.utils._pytree import tree_map

    wrapper = _LossModule(model, loss_fn)
    detached = {f"model.{n}": p.detach() for n, p in params.items()}

    def one_sample_loss(weights: dict[str, Tensor], sample: Any) -> Tensor:
        batch1 = tree_map(lambda x: x.unsqueeze(0) if isinstance(x, Tensor) else x, sample)
        return check_losses(functional_call(wrapper, weights, (batch1,)), 1).sum()

    with warnings.catch_warnings():  # ops without a batching rule fall back to a loop: correct, slower
        warnings.filterwarnings("ignore", message="There is a performance drop")
        per_sample = vmap(grad(one_sample_loss), in_dims=(None, 0), randomness="different")(detached, chunk)
    for key, g in per_sample.items():
        sink.add_per_sample(key[len("model.") :], g)
