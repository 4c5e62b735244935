"""The reference every vote engine is checked against: one backward pass per sample."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

Loss = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def brute_force_votes(
    model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], loss: Loss
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(Σ_i sign(−g_i), Σ_i g_i)`` per parameter, by a loop of batch-1 backward passes.

    Every tensor of a batch is sliced along its first axis; the number of samples is that of the
    first tensor.
    """
    counts = {n: torch.zeros(p.shape, dtype=torch.int64) for n, p in model.named_parameters()}
    grad_sum = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for batch in batches:
        for i in range(next(iter(batch.values())).shape[0]):
            model.zero_grad()
            loss(model, {k: v[i : i + 1] for k, v in batch.items()}).sum().backward()
            for n, p in model.named_parameters():
                counts[n] += torch.sign(-p.grad).long()
                grad_sum[n] += p.grad
    model.zero_grad()
    return counts, grad_sum
