"""Running vote sums while voting: the per-sample engines' sink (:class:`Accumulator`).

Per voting parameter the accumulator keeps an ``int16`` vote counter (2 bytes; widened to
``int32`` only past 32 767 samples) and, when asked for, a float32 gradient sum (4 bytes more).
The vote itself needs only the counter: without gradient sums the C kernel's sum goes to a
scratch buffer shared by every tensor (:class:`_Scratch`: as large as the largest voted tensor
that the kernel counts, in float32), never read.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from gradfix.ops.signs import count_dtype
from gradfix.settings import Estimator
from gradfix.votes import native, tiles


class Accumulator:
    """Running vote sums and, if ``with_sums``, gradient sums (float32; float64 for float64 parameters).

    Vote sums are kept in int16 while voting, widened to int32 when the number of samples could
    exceed int16's range, and returned in the smallest integer dtype that holds them.
    """

    def __init__(self, params: Mapping[str, Tensor], with_counts: bool, with_sums: bool = True):
        shapes = {n: (p.shape, sum_dtype(p), p.device) for n, p in params.items()}
        self.grad_sum = _Zeros(shapes if with_sums else {})
        self.counts = _Zeros(
            {n: (p.shape, torch.int16, p.device) for n, p in params.items()} if with_counts else {}
        )
        self.with_sums = with_sums
        self.scratch = _Scratch()
        self.hits = dict.fromkeys(params, 0)
        self.n = 0

    def _sum_into(self, name: str, numel: int, like: Tensor) -> Tensor:
        """Where the C kernel adds this tensor's gradient sum: the kept sum, or scratch memory."""
        if self.with_sums:
            return self.grad_sum[name].view(-1)
        return self.scratch.take(numel, like.dtype, like.device)

    def add_per_sample(self, name: str, grads: Tensor) -> None:
        """Add the per-sample gradients of one tensor, shape ``[b, *shape]`` (one pass in C if it can)."""
        flat = grads.detach().reshape(grads.shape[0], -1)
        counts = self.counts[name]
        hits = native.add_votes(flat, self._sum_into(name, flat.shape[1], flat), counts.view(-1))
        if hits is None:
            signs = torch.sign(flat)
            if self.with_sums:
                grad_sum = self.grad_sum[name]
                grad_sum += flat.sum(dim=0).view(grad_sum.shape).to(grad_sum.dtype)
            counts -= signs.sum(dim=0).view(counts.shape).to(counts.dtype)  # Σ sign(−g) = −Σ sign(g), exact
            hits = int(signs.ne(0).any(dim=1).sum())
        self.hits[name] += hits

    def add_linear(self, name: str, x: Tensor, grad_out: Tensor) -> bool:
        """Add a linear weight's per-sample gradients ``δ_bᵀ x_b`` without storing them, if it can.

        Off the CPU and for half-precision layers by tiles of output rows
        (:func:`gradfix.votes.tiles.add_linear_votes`); otherwise with the C kernel, when it runs.
        """
        x, grad_out, counts = x.detach(), grad_out.detach(), self.counts[name]
        if tiles.wanted(x.device, x.dtype):
            hits: int | None = tiles.add_linear_votes(
                x, grad_out, counts, self.grad_sum[name] if self.with_sums else None
            )
        else:
            sums = (
                self.grad_sum[name]
                if self.with_sums
                else self.scratch.take(counts.numel(), x.dtype, x.device)
            )
            hits = native.add_linear_votes(x, grad_out, sums.view(counts.shape), counts)
        if hits is None:
            return False
        self.hits[name] += hits
        return True

    def add_rows(self, name: str, rows: Tensor, grads: Tensor, samples: Tensor) -> None:
        """Add per-sample gradients given only on some rows (an embedding): the others are 0.

        Entry ``k`` is the gradient of row ``rows[k]`` for sample ``samples[k]`` (each pair once).
        """
        grads = grads.detach()
        if self.with_sums:
            self.grad_sum[name].index_add_(0, rows, grads.to(self.grad_sum[name].dtype))
        self.counts[name].index_add_(0, rows, -torch.sign(grads).to(self.counts[name].dtype))
        self.hits[name] += int(torch.unique(samples[grads.flatten(1).ne(0).any(dim=1)]).numel())

    def widen_for(self, incoming: int) -> None:
        """Before a batch: switch the counters to int32 if ``n`` plus its samples could overflow int16."""
        if self.counts.shapes and self.n + incoming > torch.iinfo(torch.int16).max:
            self.counts.cast(torch.int32)

    def reset(self, name: str) -> None:
        """Forget everything added for ``name`` (its votes are recomputed)."""
        if self.with_sums:
            self.grad_sum[name].zero_()
        if self.counts.shapes:
            self.counts[name].zero_()
        self.hits[name] = 0

    def add_summed(self, name: str, grad: Tensor | None, samples: int) -> None:
        """Add the gradient of a summed loss over ``samples`` samples (mean estimator)."""
        if grad is not None:
            self.grad_sum[name] += grad.detach().to(self.grad_sum[name].dtype)
            self.hits[name] += samples if bool(grad.ne(0).any()) else 0

    def state_bytes(self) -> int:
        """Bytes of the running sums held now (counters and gradient sums made so far)."""
        return sum(t.numel() * t.element_size() for t in [*self.counts.values(), *self.grad_sum.values()])

    def result(self, estimator: Estimator) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(counts, grad_sum)`` on the CPU, counts in the smallest dtype that holds ``n``.

        Each counter is converted and released in turn, so the int16 and the narrower copy of
        one tensor only are held together.
        """
        dtype = count_dtype(self.n)
        counts: dict[str, Tensor] = {}
        for name in list(self.counts.shapes):
            counts[name] = self.counts[name].to(device="cpu", dtype=dtype)
            del self.counts[name]
        grad_sum = {k: v.cpu() for k, v in self.grad_sum.all().items()}
        return counts, grad_sum


class _Scratch:
    """One flat buffer, reused by every tensor, for sums the C kernel forms but nobody keeps."""

    def __init__(self) -> None:
        self.buffer: Tensor | None = None

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A flat tensor of ``numel`` values (their content is meaningless)."""
        buf = self.buffer
        if buf is None or buf.dtype != dtype or buf.device != device or buf.numel() < numel:
            self.buffer = buf = torch.zeros(numel, dtype=dtype, device=device)
        return buf[:numel]


class _Zeros(dict):
    """``{name: tensor of zeros}``, each made when first asked for.

    The running sums are thus allocated during the first backward, as a gradient would be, rather
    than before the forward pass: the allocator then reuses the memory the forward pass freed.
    """

    def __init__(self, shapes: Mapping[str, tuple[torch.Size, torch.dtype, torch.device]]):
        super().__init__()
        self.shapes = dict(shapes)

    def __missing__(self, name: str) -> Tensor:
        shape, dtype, device = self.shapes[name]
        made = self[name] = torch.zeros(shape, dtype=dtype, device=device)
        return made

    def all(self) -> dict[str, Tensor]:
        """Every tensor, in the order of the names given (made now if never asked for)."""
        return {name: self[name] for name in self.shapes}

    def cast(self, dtype: torch.dtype) -> None:
        """Switch every tensor, made or to be made, to ``dtype``."""
        self.shapes = {name: (shape, dtype, device) for name, (shape, _, device) in self.shapes.items()}
        for name, tensor in self.items():
            self[name] = tensor.to(dtype)


def sum_dtype(p: Tensor) -> torch.dtype:
    """The dtype of a parameter's gradient sum: float64 for float64 parameters, float32 otherwise."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32
