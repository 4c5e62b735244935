"""Checkable quantities: the first-order descent report, sign agreement, tensor summaries."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from gradfix.checks import check_same_architecture
from gradfix.ops.reductions import ordered_dot
from gradfix.votes import SignVotes


@dataclass(frozen=True)
class TensorDescent:
    """One tensor's share of the descent report."""

    name: str
    numel: int
    kept: int
    flipped: int
    inner: float
    nonzero: int = -1
    """Non-zero coordinates of ``τ_A`` (``-1``: not counted, then every coordinate counts)."""

    @property
    def base_count(self) -> int:
        """What the shares are of: ``τ_A``'s non-zero coordinates (all coordinates if not counted)."""
        return self.nonzero if self.nonzero >= 0 else self.numel

    @property
    def kept_fraction(self) -> float:
        """Share of ``τ_A``'s non-zero coordinates that the update keeps with their sign."""
        return self.kept / self.base_count if self.base_count else 0.0


@dataclass(frozen=True)
class DescentReport:
    """``⟨ḡ, Δ⟩`` per tensor and in total, and the fraction of coordinates kept.

    To first order ``L(θ_B + Δ) ≈ L(θ_B) + ⟨ḡ, Δ⟩`` (Eq. 6), so a negative ``total_inner``
    predicts a lower loss on the voting samples.
    """

    tensors: list[TensorDescent]
    alpha: float

    @property
    def total_inner(self) -> float:
        """``⟨ḡ, Δ⟩`` over the whole model."""
        return sum(t.inner for t in self.tensors)

    @property
    def kept_fraction(self) -> float:
        """Share of ``τ_A``'s non-zero coordinates that the update keeps with their sign."""
        total = sum(t.base_count for t in self.tensors)
        return sum(t.kept for t in self.tensors) / total if total else 0.0

    @property
    def flipped_fraction(self) -> float:
        """Share of ``τ_A``'s non-zero coordinates whose sign was flipped (sign forcing, random signs)."""
        total = sum(t.base_count for t in self.tensors)
        return sum(t.flipped for t in self.tensors) / total if total else 0.0

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready form (``gradfix.json``)."""
        return {
            "alpha": self.alpha,
            "total_inner": self.total_inner,
            "kept_fraction": self.kept_fraction,
            "flipped_fraction": self.flipped_fraction,
            "tensors": [asdict(t) | {"kept_fraction": t.kept_fraction} for t in self.tensors],
        }

    def format(self, limit: int = 20) -> str:
        """A short human-readable table: the ``limit`` tensors with the most negative ``⟨ḡ, Δ⟩``."""
        rows = sorted(self.tensors, key=lambda t: t.inner)[:limit]
        width = max([len(r.name) for r in rows] + [6])
        lines = [f"{'tensor':<{width}}  {'kept':>7}  {'<g, delta>':>12}"]
        lines += [f"{r.name:<{width}}  {r.kept_fraction:>7.2%}  {r.inner:>12.4e}" for r in rows]
        lines.append(
            f"{'total':<{width}}  {self.kept_fraction:>7.2%}  {self.total_inner:>12.4e}"
            f"   (first-order loss change at alpha={self.alpha:g})"
        )
        return "\n".join(lines)


def descent_report(
    gradient: SignVotes | Mapping[str, Tensor],
    update: Mapping[str, Tensor],
    source: Mapping[str, Tensor] | None = None,
    alpha: float = 1.0,
) -> DescentReport:
    """First-order descent report of the transported update ``Δ = α · (m ⊙ τ_A)``.

    ``inner = ⟨ḡ, Δ⟩ = α Σ_i ḡ_i (m ⊙ τ_A)_i`` with ``ḡ`` the mean gradient of the target on the
    voting samples (from :class:`SignVotes`, or a given gradient mapping). ``update`` is the masked
    task vector before scaling by ``α``. A coordinate is *kept* where the update has ``τ_A``'s
    sign and *flipped* where it has the opposite sign (``source`` is ``τ_A``; without it, every
    non-zero coordinate counts as kept); shares are of ``τ_A``'s non-zero coordinates. Tensors
    without a gradient contribute no inner product.
    """
    grads = gradient.mean_gradient() if isinstance(gradient, SignVotes) else dict(gradient)
    rows = []
    for name, delta in update.items():
        ref = source[name] if source is not None else delta
        same = torch.sign(delta) * torch.sign(ref)
        g = grads.get(name)
        inner = ordered_dot(g, delta) * alpha if g is not None else 0.0
        kept, flipped, nonzero = int((same > 0).sum()), int((same < 0).sum()), int(ref.ne(0).sum())
        rows.append(TensorDescent(name, delta.numel(), kept, flipped, inner, nonzero))
    return DescentReport(rows, alpha)


def sign_agreement(first: Mapping[str, Tensor], second: Mapping[str, Tensor]) -> dict[str, float]:
    """Per tensor, the share of coordinates where both are non-zero and have the same sign,
    among coordinates where both are non-zero (``nan`` when there are none)."""
    shared = [n for n in first if n in second]
    check_same_architecture(
        {
            "first": {n: tuple(first[n].shape) for n in shared},
            "second": {n: tuple(second[n].shape) for n in shared},
        },
        shared,
    )
    out = {}
    for name in shared:
        a, b = torch.sign(first[name]), torch.sign(second[name])
        both = (a != 0) & (b != 0)
        total = int(both.sum())
        out[name] = float(((a == b) & both).sum()) / total if total else float("nan")
    return out


def tensor_summary(name: str, tensor: Tensor) -> dict[str, object]:
    """Shape, dtype and basic statistics of one tensor (``gradfix inspect``)."""
    t = tensor.detach()
    dtype = str(t.dtype).replace("torch.", "")
    row: dict[str, object] = {"name": name, "shape": list(t.shape), "dtype": dtype}
    row["numel"] = t.numel()
    if t.is_floating_point() and t.numel():
        f = t.double()
        row.update(
            mean=float(f.mean()),
            std=float(f.std()) if t.numel() > 1 else 0.0,
            abs_max=float(f.abs().max()),
            norm=float(f.norm()),
            zero_fraction=float((t == 0).double().mean()),
            finite=bool(torch.isfinite(t).all()),
        )
    return row
