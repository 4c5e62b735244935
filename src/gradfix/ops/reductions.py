"""Sums whose result does not depend on the number of threads.

PyTorch splits a large reduction (``tensor.sum()``) between threads, so its rounding, and so its
last bits, change with the thread count. :func:`ordered_sum` sums fixed rows of ``CHUNK`` values
(one row is one thread's vectorised loop, the same at any thread count) and adds the row sums
with :func:`math.fsum`, which is exactly rounded and so independent of their order.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CHUNK = 4096
"""Values per row of :func:`ordered_sum`."""


def ordered_sum(x: Tensor) -> float:
    """``Σ x`` in float64, the same bits at any thread count."""
    flat = x.detach().reshape(-1).to(torch.float64)
    if flat.numel() <= CHUNK:
        return math.fsum(flat.tolist())
    whole = flat.numel() // CHUNK * CHUNK
    rows = flat[:whole].reshape(-1, CHUNK).sum(dim=1)
    return math.fsum([*rows.tolist(), *flat[whole:].tolist()])


def ordered_dot(a: Tensor, b: Tensor) -> float:
    """``⟨a, b⟩`` in float64, the same bits at any thread count (on ``a``'s device when ``b`` is
    elsewhere: a gradient on a GPU against an update read on the CPU)."""
    return ordered_sum(a.to(torch.float64) * b.to(device=a.device, dtype=torch.float64))
