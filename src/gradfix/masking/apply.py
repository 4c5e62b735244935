"""The one masking path: ``m ⊙ τ_A`` tensor by tensor, in row slices, for every mask.

:func:`masked_rows` reads a tensor of ``τ_A`` and its reference in row slices (one slice: the
whole tensor, for the in-memory API; slices of about 4 MiB for the streaming jobs), applies a
registered mask (:mod:`gradfix.ops.masks`), and yields each slice's update with its mean gradient.
Masks that need statistics of the whole tensor get them from a first pass, so a tensor masked in
slices equals the tensor masked whole. :class:`TensorTally` adds up what the record reports: the
share of ``τ_A``'s non-zero coordinates kept with their sign, and ``⟨ḡ, α·τ'⟩``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gradfix.diagnostics import TensorDescent
from gradfix.errors import GradfixError
from gradfix.io import CheckpointReader
from gradfix.io.adapters import LoraAdapter
from gradfix.io.checkpoint import SLICE_BYTES, row_slices
from gradfix.masking.references import Reference, check_values
from gradfix.ops.masks import Mask, MaskOptions, SliceContext, TensorStats
from gradfix.ops.reductions import ordered_dot


class TauRows:
    """Rows of ``τ_A``, tensor by tensor: from a mapping, from two open checkpoints, or from a
    PEFT LoRA adapter over its base (:class:`gradfix.io.adapters.LoraAdapter`)."""

    def __init__(
        self,
        tensors: Mapping[str, Tensor] | None = None,
        base: CheckpointReader | None = None,
        finetuned: CheckpointReader | None = None,
        adapter: LoraAdapter | None = None,
    ):
        self.tensors, self.base, self.finetuned, self.adapter = tensors, base, finetuned, adapter

    def rows(self, name: str, start: int, stop: int) -> Tensor:
        """``τ_A`` of rows ``start:stop`` (float32 from checkpoints or an adapter)."""
        if self.tensors is not None:
            t = self.tensors[name]
            return t if t.dim() == 0 else t[start:stop]
        if self.adapter is not None:
            return self.adapter.rows(name, start, stop, self.base)
        assert self.base is not None and self.finetuned is not None
        return self.finetuned.rows(name, start, stop).float() - self.base.rows(name, start, stop).float()

    def whole(self, name: str, shape: Sequence[int]) -> Tensor:
        """The whole tensor ``name`` of ``τ_A``."""
        return self.rows(name, 0, shape[0] if len(shape) else 1)


@dataclass(frozen=True)
class MaskedRows:
    """One slice of a tensor: ``τ_A``, the update ``τ'`` and the mean gradient ``ḡ`` (votes only)."""

    start: int
    stop: int
    tau: Tensor
    update: Tensor
    gradient: Tensor | None


def tensor_stats(
    name: str, slices: Sequence[tuple[int, int]], tau: TauRows, reference: Reference
) -> TensorStats:
    """``Σ τ²``, ``Σ r²`` and ``⟨r, τ⟩`` over the whole tensor (float64), ``r`` the real reference."""
    tau_sq = value_sq = inner = 0.0
    numel = 0
    for start, stop in slices:
        t = tau.rows(name, start, stop).to(torch.float64)
        r = reference.rows(name, start, stop)[0].value_or_sign(torch.float64).to(torch.float64)
        tau_sq += ordered_dot(t, t)
        value_sq += ordered_dot(r, r)
        inner += ordered_dot(t, r)
        numel += t.numel()
    return TensorStats(numel, tau_sq, value_sq, inner)


def masked_rows(
    name: str,
    shape: tuple[int, ...],
    tau: TauRows,
    reference: Reference | None,
    mask: Mask,
    options: MaskOptions,
    keep_unvoted: bool = False,
    budget: int | None = SLICE_BYTES,
) -> Iterator[MaskedRows]:
    """The update of tensor ``name`` slice by slice.

    ``none`` passes ``τ_A`` through. A tensor the reference does not cover is passed through
    with ``keep_unvoted`` and zeroed otherwise (what a zero vote means); the caller decides
    beforehand whether such tensors are an error. ``budget=None`` gives one slice.
    """
    whole = [(0, shape[0] if shape else 1)]
    slices = whole if budget is None else list(row_slices(shape, budget=budget))
    voted = mask.needs_reference and reference is not None and reference.covers(name)
    if not voted:
        passes = not mask.needs_reference or keep_unvoted
        for start, stop in slices:
            t = tau.rows(name, start, stop)
            yield MaskedRows(start, stop, t, t if passes else torch.zeros_like(t), None)
        return
    assert reference is not None
    check_values(reference, mask.name, mask.reads)
    stats = tensor_stats(name, slices, tau, reference) if mask.needs_stats else None
    prepared = mask.prepare(name, shape, options)
    for start, stop in slices:
        t = tau.rows(name, start, stop)
        rows, gradient = reference.rows(name, start, stop)
        context = SliceContext(name, start, stop, options, stats, prepared)
        yield MaskedRows(start, stop, t, mask.apply(t, rows, context), gradient)


@dataclass
class TensorTally:
    """What the record reports of one tensor, added up over its slices."""

    name: str
    alpha: float = 1.0
    numel: int = 0
    nonzero: int = 0
    kept: int = 0
    flipped: int = 0
    inner: float = 0.0

    def add(self, rows: MaskedRows) -> None:
        """Count a slice: coordinates of ``τ_A`` kept or flipped, and ``α ⟨ḡ, τ'⟩``."""
        same = torch.sign(rows.update) * torch.sign(rows.tau)
        self.kept += int((same > 0).sum())
        self.flipped += int((same < 0).sum())
        self.nonzero += int(rows.tau.ne(0).sum())
        self.numel += rows.tau.numel()
        if rows.gradient is not None:
            self.inner += ordered_dot(rows.gradient, rows.update) * self.alpha

    def descent(self) -> TensorDescent:
        """The tensor's row of the descent report."""
        return TensorDescent(self.name, self.numel, self.kept, self.flipped, self.inner, self.nonzero)


def uncovered_tensors(
    names: Sequence[str], nonzero: set[str] | Sequence[str], reference: Reference | None
) -> list[str]:
    """The non-zero tensors of ``τ_A`` that the reference does not cover (in ``names`` order)."""
    wanted = set(nonzero)
    return [n for n in names if n in wanted and (reference is None or not reference.covers(n))]


def unvoted_error(uncovered: Sequence[str]) -> GradfixError:
    """The error for tensors of ``τ_A`` without votes under ``unvoted="error"`` (names the first ten)."""
    more = f" and {len(uncovered) - 10} more" if len(uncovered) > 10 else ""
    return GradfixError(
        f"{len(uncovered)} tensor(s) of the task vector have no votes from the target (no sample gave "
        f"them a gradient: frozen, or unused by the loss; or the votes files lack them): "
        f"{', '.join(uncovered[:10])}{more}; exclude them "
        "(--exclude), or set --unvoted to 'drop' (zero them) or 'keep' (add them unmasked)"
    )
