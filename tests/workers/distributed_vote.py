"""Run by torchrun in the distributed test: each rank votes on its share, rank 0 saves the total."""

from __future__ import annotations

import sys

import torch
from torch import nn

from gradfix import estimate_signs
from gradfix.votes.distributed import all_reduce_votes, end_process_group, init_from_environment, shard, world


def build() -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    """The same model and 23 samples (one batch each) in every process."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 4)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(23, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (23,), generator=g)
    return model, [{"x": x[i : i + 1], "y": y[i : i + 1]} for i in range(23)]


def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


if __name__ == "__main__":
    assert init_from_environment("gloo")
    model, samples = build()
    votes = all_reduce_votes(estimate_signs(model, shard(samples), loss, progress=False))
    lean = all_reduce_votes(estimate_signs(model, shard(samples), loss, progress=False, gradient="none"))
    if world()[0] == 0:
        votes.save(sys.argv[1])
        lean.save(sys.argv[1].replace(".safetensors", "-counts.safetensors"))
    end_process_group()
