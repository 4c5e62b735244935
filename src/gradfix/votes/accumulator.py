"""Running vote sums while voting: the per-sample engines' sink (:class:`Accumulator`).

Per voting parameter the accumulator keeps a vote counter and, when asked for, a float32 gradient
sum (4 bytes more). A vote count never exceeds the number of samples voted, so when that number is
known before the vote (a list of batches: the transport's shots) the counter is the smallest
integer type that holds it, ``int8`` below 128 samples (1 byte per voting parameter while voting,
and the result is that counter, with no conversion); otherwise ``int16``, widened to ``int32``
only past 32 767 samples. The vote itself needs only the counter: without gradient sums the C
kernel forms each sum in registers and writes it nowhere, and the other paths do not form it.
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

    Vote sums are counted in :func:`counter_dtype` of ``samples`` (the number of samples the vote
    will add, when known: ``int8`` below 128), widened when more samples come than that type holds
    (:meth:`widen_for`), and returned in the smallest integer dtype that holds them.
    """

    def __init__(
        self,
        params: Mapping[str, Tensor],
        with_counts: bool,
        with_sums: bool = True,
        samples: int | None = None,
    ):
        shapes = {n: (p.shape, sum_dtype(p), p.device) for n, p in params.items()}
        self.grad_sum = _Zeros(shapes if with_sums else {})
        dtype = counter_dtype(samples)
        self.counts = _Zeros(
            {n: (p.shape, dtype, p.device) for n, p in params.items()} if with_counts else {}
        )
        self.with_sums = with_sums
        self.hits = dict.fromkeys(params, 0)
        self.n = 0

    def add_per_sample(self, name: str, grads: Tensor) -> None:
        """Add the per-sample gradients of one tensor, shape ``[b, *shape]`` (one pass in C if it can)."""
        flat = grads.detach().reshape(grads.shape[0], -1)
        counts = self.counts[name]
        sums = self.grad_sum[name].view(-1) if self.with_sums else None
        hits = native.add_votes(flat, sums, counts.view(-1))
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
        sums = self.grad_sum[name] if self.with_sums else None
        if tiles.wanted(x.device, x.dtype):
            hits: int | None = tiles.add_linear_votes(x, grad_out, counts, sums)
        else:
            hits = native.add_linear_votes(x, grad_out, sums, counts)
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
        """Before a batch: widen the counters if ``n`` plus its samples could overflow their type
        (to int16 at least, then int32: a vote whose size was not known, or was exceeded)."""
        if not self.counts.shapes:
            return
        dtype = self.counts.dtype()
        if self.n + incoming > torch.iinfo(dtype).max:
            self.counts.cast(counter_dtype(max(self.n + incoming, torch.iinfo(torch.int8).max + 1)))

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

    def dtype(self) -> torch.dtype:
        """The dtype of the tensors (all share one); int16 when there are none."""
        return next((dtype for _, dtype, _ in self.shapes.values()), torch.int16)

    def cast(self, dtype: torch.dtype) -> None:
        """Switch every tensor, made or to be made, to ``dtype``."""
        self.shapes = {name: (shape, dtype, device) for name, (shape, _, device) in self.shapes.items()}
        for name, tensor in self.items():
            self[name] = tensor.to(dtype)


def counter_dtype(samples: int | None) -> torch.dtype:
    """The counters' dtype for a vote over ``samples`` samples: the smallest integer type that
    holds that many (``int8`` below 128, so 1 byte per voting parameter), at most ``int32`` (the C
    kernel's widest); ``int16`` when the number is not known (widened as samples come)."""
    if samples is None:
        return torch.int16
    dtype = count_dtype(samples)
    return dtype if dtype in (torch.int8, torch.int16) else torch.int32


def sum_dtype(p: Tensor) -> torch.dtype:
    """The dtype of a parameter's gradient sum: float64 for float64 parameters, float32 otherwise."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32
