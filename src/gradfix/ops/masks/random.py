"""The random-sign ablation: ``|τ_A|`` with uniformly random signs, seeded per tensor."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from gradfix.ops.masks.registry import Mask, MaskOptions, ReferenceRows, SliceContext, register_mask


def seeded_generator(seed: int, name: str) -> torch.Generator:
    """The random generator of tensor ``name``: seeded from ``seed`` and the name, so that a tensor's
    random draw does not depend on which other tensors are processed, or in which order."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def random_signs(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """int8 signs ``s_i`` uniform in {−1, +1} of a whole tensor."""
    bits = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8)
    return bits * 2 - 1


def random_sign_task_vector(tau: Tensor, generator: torch.Generator) -> Tensor:
    """Random-sign ablation: ``τ'_i = |τ_i| · s_i`` with ``s_i`` uniform in {−1, +1}."""
    return tau.abs() * random_signs(tuple(tau.shape), generator).to(tau.dtype)


@register_mask
class RandomSigns(Mask):
    """``|τ_A| ⊙ s`` with ``s`` drawn once per tensor from the seed and the tensor's name."""

    name = "random"
    summary = "|τ_A| with uniformly random signs (ablation)"
    equation = "τ'_i = |τ_i| · s_i,  s_i ~ U{−1, +1}"
    reads = "nothing"

    def prepare(self, name: str, shape: tuple[int, ...], options: MaskOptions) -> Tensor:
        """The signs of the whole tensor (one byte per value)."""
        return random_signs(shape, seeded_generator(options.seed, name))

    def apply(self, tau: Tensor, reference: ReferenceRows, context: SliceContext) -> Tensor:
        """``|τ| ⊙ s`` for the rows at hand."""
        signs = context.prepared
        rows = signs if signs.dim() == 0 else signs[context.start : context.stop]
        return tau.abs() * rows.to(tau.dtype)
