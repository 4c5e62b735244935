"""The mask registry: one :class:`Mask` object per strategy, registered by name.

A mask turns the rows of ``τ_A`` at hand into the update ``τ'`` (``m ⊙ τ_A`` for the 0/1 and soft
masks, another vector for sign forcing and random signs), reading one field of the reference
(:class:`ReferenceRows`): its sign ``r`` (the votes' estimate ``ŝ`` or the oracle's
``sign(τ_B)``), its real values (``−ḡ`` or ``τ_B``) or its vote margins ``v / n``. A mask that
needs statistics of the whole tensor (a root-mean-square, an inner product) says so with
``needs_stats``; the caller then makes a first pass over the tensor (:class:`TensorStats`), so that
a tensor masked slice by slice gives the same result as a tensor masked whole.

Adding a mask is one new file in this folder that defines a :class:`Mask` subclass decorated with
:func:`register_mask`, plus its test.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import Tensor

from gradfix.registry import Registry

Reads = Literal["nothing", "sign", "value", "margin"]
"""The field of the reference a mask reads."""


@dataclass(frozen=True)
class MaskOptions:
    """The options every mask may read: ``gamma`` (magnitude), ``threshold`` (gate), ``seed`` (random)."""

    gamma: float = 1.0
    threshold: float = 0.3
    seed: int = 0


@dataclass(frozen=True)
class ReferenceRows:
    """The reference for the rows of ``τ_A`` at hand.

    ``sign``: int8 in {−1, 0, 1}; ``value``: the real-valued reference (``−ḡ`` of the votes, or
    the oracle ``τ_B``), ``None`` when the reference has none; ``margin``: the vote margin
    ``v / n`` in [−1, 1], ``None`` without vote counts (the sign then stands for a unanimous vote).
    """

    sign: Tensor
    value: Tensor | None = None
    margin: Tensor | None = None

    def value_or_sign(self, dtype: torch.dtype) -> Tensor:
        """The real-valued reference, or the sign in ``dtype`` when there is none."""
        return self.value if self.value is not None else self.sign.to(dtype)

    def margin_or_sign(self) -> Tensor:
        """The vote margin, or the sign as float32 (a unanimous vote) when there are no counts."""
        return self.margin if self.margin is not None else self.sign.to(torch.float32)


@dataclass(frozen=True)
class TensorStats:
    """Sums over a whole tensor, for masks that act on slices (float64 sums).

    ``tau_sq = Σ τ²``, ``value_sq = Σ r²`` and ``inner = ⟨r, τ⟩`` with ``r`` the real-valued
    reference, over ``numel`` coordinates.
    """

    numel: int
    tau_sq: float
    value_sq: float
    inner: float

    @property
    def scales(self) -> tuple[float, float]:
        """``(rms(τ), rms(r))`` of the whole tensor."""
        n = max(self.numel, 1)
        return math.sqrt(self.tau_sq / n), math.sqrt(self.value_sq / n)


@dataclass(frozen=True)
class SliceContext:
    """Where the rows at hand lie in their tensor, and what the mask prepared for that tensor."""

    name: str
    start: int
    stop: int
    options: MaskOptions
    stats: TensorStats | None = None
    prepared: Any = None


class Mask(ABC):
    """A mask strategy: name, one-line summary, equation, what it reads, and how it applies."""

    name: ClassVar[str]
    summary: ClassVar[str]
    equation: ClassVar[str]
    reads: ClassVar[Reads] = "sign"
    needs_reference: ClassVar[bool] = True
    """False only for ``none``: the mask applies to tensors without votes too."""
    needs_stats: ClassVar[bool] = False

    def prepare(self, name: str, shape: tuple[int, ...], options: MaskOptions) -> Any:
        """Per-tensor state computed once before the slices (default: none)."""
        return None

    @abstractmethod
    def apply(self, tau: Tensor, reference: ReferenceRows, context: SliceContext) -> Tensor:
        """The update ``τ'`` for the rows ``tau`` of ``τ_A`` (a new tensor of ``tau``'s dtype)."""


MASKS: Registry[Mask] = Registry("mask")
"""Every registered mask, by name, in registration order."""

M = TypeVar("M", bound=type[Mask])


def register_mask(cls: M) -> M:
    """Class decorator: register one instance of a :class:`Mask` subclass under its ``name``."""
    MASKS.register(cls.name, cls())
    return cls


def get_mask(name: str) -> Mask:
    """The registered mask ``name``; a :class:`ConfigError` listing the choices otherwise."""
    return MASKS.lookup(name)


def check_same_shape(a: Tensor, b: Tensor) -> None:
    """Raise ``ValueError`` when the task vector and the reference differ in shape."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: task vector {tuple(a.shape)} vs reference {tuple(b.shape)}")


def rms(x: Tensor) -> Tensor:
    """Root-mean-square of ``x`` (1 for an all-zero tensor, so that dividing by it is harmless)."""
    value = x.pow(2).mean().sqrt()
    return value if value > 0 else torch.ones((), dtype=x.dtype)
