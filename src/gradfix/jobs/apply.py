"""Streaming application of a masked task vector: ``θ_target + α · mask(τ_A)``, slice by slice.

Every tensor is read, masked and written in row slices of about :data:`SLICE_BYTES`, and votes
saved in files are read the same way, so memory does not grow with the size of the model: the
largest working set is a few slices (plus, for the random-sign ablation, one byte per value of
the tensor at hand).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradfix.checks import FiniteCheck, check_same_architecture, count_nonfinite
from gradfix.diagnostics import DescentReport, TensorDescent
from gradfix.errors import CheckpointError, ConfigError, GradfixError
from gradfix.io import CheckpointReader, open_checkpoint
from gradfix.io.streaming import StreamingShardedWriter, TensorPlan
from gradfix.jobs.common import raise_if_overflow
from gradfix.masking import seeded_generator
from gradfix.ops.masks import apply_mask
from gradfix.ops.signs import majority_sign, mean_sign
from gradfix.task_vector import apply_tensor
from gradfix.votes import SignVotes

SLICE_BYTES = 4 * 2**20


def row_slices(
    shape: Sequence[int], itemsize: int = 4, budget: int = SLICE_BYTES
) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` row ranges of about ``budget`` bytes (a 0-d tensor is one slice)."""
    if not shape:
        yield 0, 1
        return
    row = max(1, math.prod(shape[1:]) * itemsize)
    step = max(1, budget // row)
    for start in range(0, shape[0], step):
        yield start, min(shape[0], start + step)
    if shape[0] == 0:
        yield 0, 0


class VoteSource:
    """Votes readable tensor by tensor in row slices: in-memory votes and saved votes files, summed.

    Files are read lazily (headers only until a slice is asked for). Every source must hold the
    same tensors with the same shapes; the estimator decides how a slice becomes a sign.
    """

    def __init__(self, votes: Sequence[SignVotes], files: Sequence[str | Path], estimator: str):
        self.votes = list(votes)
        self.readers: list[CheckpointReader] = []
        self.estimator = estimator
        shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        self.num_samples = sum(v.num_samples for v in self.votes)
        self.hits: dict[str, int] = {}
        self.has_counts = all(bool(v.counts) for v in self.votes)
        for i, v in enumerate(self.votes):
            shapes[f"votes {i + 1}"] = {n: tuple(g.shape) for n, g in v.grad_sum.items()}
            for n, h in v.hits.items():
                self.hits[n] = self.hits.get(n, 0) + h
        for path in files:
            reader = open_checkpoint(path)
            self.readers.append(reader)
            meta = reader.metadata()
            if meta.get("gradfix_kind") != "gradfix.sign_votes":
                raise CheckpointError(f"{path}: not a gradfix votes file (no gradfix_kind header)")
            try:
                self.num_samples += int(meta["num_samples"])
                for n, h in json.loads(meta.get("hits", "{}")).items():
                    self.hits[n] = self.hits.get(n, 0) + int(h)
            except (KeyError, ValueError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{path}: votes header is malformed ({exc!r})") from exc
            file_shapes = reader.shapes()
            shapes[str(path)] = {
                k[len("grad_sum/") :]: s for k, s in file_shapes.items() if k.startswith("grad_sum/")
            }
            self.has_counts = self.has_counts and any(k.startswith("counts/") for k in file_shapes)
        if not shapes:
            raise ConfigError("no votes were given")
        check_same_architecture(shapes)
        self.shapes = next(iter(shapes.values()))
        if estimator == "majority" and not self.has_counts:
            raise ConfigError("the majority estimator needs vote counts; these votes were taken with 'mean'")
        self._finite = FiniteCheck()

    def covers(self, name: str) -> bool:
        """Whether ``name`` was voted on and received a gradient from at least one sample."""
        return name in self.shapes and self.hits.get(name, 0) > 0

    def rows(self, name: str, start: int, stop: int) -> tuple[Tensor | None, Tensor]:
        """Summed vote counts (int32; ``None`` without counts) and gradient sums (float32) of some rows."""
        counts: Tensor | None = None
        grad: Tensor | None = None
        for v in self.votes:
            g = v.grad_sum[name] if v.grad_sum[name].dim() == 0 else v.grad_sum[name][start:stop]
            grad = g.float() if grad is None else grad + g.float()
            if self.has_counts:
                c = v.counts[name] if v.counts[name].dim() == 0 else v.counts[name][start:stop]
                counts = c.int() if counts is None else counts + c.int()
        for reader in self.readers:
            g = reader.rows(f"grad_sum/{name}", start, stop)
            if not self._finite.check(reader.path, f"grad_sum/{name}", g):
                self._finite.raise_if_any("the votes file is corrupted")
            grad = g.float() if grad is None else grad + g.float()
            if self.has_counts:
                c = reader.rows(f"counts/{name}", start, stop).int()
                counts = c if counts is None else counts + c
        assert grad is not None
        return counts, grad

    def close(self) -> None:
        """Release the votes files."""
        for reader in self.readers:
            reader.close()


@dataclass
class MaskPlan:
    """How each slice of ``τ_A`` is masked: the strategy and its options."""

    mask: str = "agreement"
    alpha: float = 1.0
    gamma: float = 1.0
    threshold: float = 0.3
    seed: int = 0
    unvoted: str = "error"


def scan_task_vector(base: CheckpointReader, finetuned: CheckpointReader, names: Sequence[str]) -> set[str]:
    """Read ``τ_A = finetuned − base`` slice by slice: raise on NaN/Inf, return the non-zero tensors."""
    finite = FiniteCheck()
    nonzero: set[str] = set()
    shapes = base.shapes()
    for name in names:
        for start, stop in row_slices(shapes[name]):
            b, f = base.rows(name, start, stop), finetuned.rows(name, start, stop)
            ok = finite.check(base.file_of(name), name, b) & finite.check(finetuned.file_of(name), name, f)
            if ok and name not in nonzero and bool((f.float() - b.float()).ne(0).any()):
                nonzero.add(name)
    finite.raise_if_any()
    return nonzero


def uncovered_tensors(names: Sequence[str], nonzero: set[str], source: VoteSource | None) -> list[str]:
    """The non-zero tensors of ``τ_A`` that the votes do not cover (in ``names`` order)."""
    return [n for n in names if n in nonzero and (source is None or not source.covers(n))]


def unvoted_error(uncovered: Sequence[str]) -> GradfixError:
    """The error for tensors of ``τ_A`` without votes under ``--unvoted error`` (names the first ten)."""
    more = f" and {len(uncovered) - 10} more" if len(uncovered) > 10 else ""
    return GradfixError(
        f"{len(uncovered)} tensor(s) of the task vector have no votes from the target (frozen, unused "
        f"by the loss, or missing from the votes): {', '.join(uncovered[:10])}{more}; exclude them "
        "(--exclude), or set --unvoted to 'drop' (zero them) or 'keep' (add them unmasked)"
    )


def stream_transport(
    base: CheckpointReader,
    finetuned: CheckpointReader,
    target: CheckpointReader,
    names: Sequence[str],
    nonzero: set[str],
    source: VoteSource | None,
    plan: MaskPlan,
    out: Path,
    shard_bytes: int,
) -> tuple[list[str], dict[str, float], DescentReport | None]:
    """Write ``θ_target + α · mask(τ_A)`` to ``out`` slice by slice.

    Returns the files written, the kept fraction per tensor of ``τ_A`` and, when there are votes,
    the first-order descent report ``⟨ḡ, Δ⟩``. Tensors of the target outside ``names`` are copied.
    """
    selected = set(names)
    uncovered = uncovered_tensors(names, nonzero, source)
    if plan.mask != "none" and uncovered and plan.unvoted == "error":
        raise unvoted_error(uncovered)
    dtypes, shapes = target.dtypes(), target.shapes()
    writer = StreamingShardedWriter(
        out,
        [TensorPlan(n, dtypes[n], shapes[n]) for n in target.names()],
        shard_bytes,
        {"gradfix": "transported"},
    )
    finite, overflow = FiniteCheck(), []
    kept: dict[str, float] = {}
    rows: list[TensorDescent] = []
    try:
        for name in target.names():
            if name not in selected:
                for start, stop in row_slices(shapes[name]):
                    chunk = target.rows(name, start, stop)
                    if finite.check(target.file_of(name), name, chunk) and not finite and not overflow:
                        writer.write(name, chunk)
                continue
            row = _transport_tensor(
                name,
                base,
                finetuned,
                target,
                source,
                plan,
                writer,
                finite,
                overflow,
                covered=name not in uncovered,
            )
            kept[name] = row.kept_fraction
            rows.append(row)
        finite.raise_if_any()
        raise_if_overflow(target.path, plan.alpha, overflow)
        files = [p.name for p in writer.close()]
    except BaseException:
        writer.abort()
        raise
    report = DescentReport(rows, plan.alpha) if source is not None and plan.mask != "none" else None
    return files, kept, report


def _transport_tensor(
    name: str,
    base: CheckpointReader,
    finetuned: CheckpointReader,
    target: CheckpointReader,
    source: VoteSource | None,
    plan: MaskPlan,
    writer: StreamingShardedWriter,
    finite: FiniteCheck,
    overflow: list[str],
    covered: bool,
) -> TensorDescent:
    """Mask and write one tensor slice by slice; bad inputs go to ``finite``, overflows to ``overflow``."""
    shape = target.shapes()[name]
    slices = list(row_slices(shape))
    use_votes = plan.mask != "none" and covered and source is not None
    scales = (
        _magnitude_scales(name, base, finetuned, source, slices)
        if use_votes and plan.mask == "magnitude"
        else None
    )
    whole = (
        _descent_inner(name, base, finetuned, source, slices)
        if use_votes and plan.mask == "tensorwise"
        else None
    )
    random_signs = None
    if use_votes and plan.mask == "random":
        bits = torch.randint(0, 2, shape, generator=seeded_generator(plan.seed, name), dtype=torch.int8)
        random_signs = bits * 2 - 1
    kept = flipped = numel = 0
    inner = 0.0
    for start, stop in slices:
        tau = finetuned.rows(name, start, stop).float() - base.rows(name, start, stop).float()
        theta = target.rows(name, start, stop)
        grad = None
        if not use_votes:
            masked = tau if plan.mask == "none" or plan.unvoted == "keep" else torch.zeros_like(tau)
        else:
            assert source is not None
            counts, grad_sum = source.rows(name, start, stop)
            grad = grad_sum / max(source.num_samples, 1)
            if plan.mask == "random":
                assert random_signs is not None
                sign = random_signs if random_signs.dim() == 0 else random_signs[start:stop]
                masked = apply_mask("forcing", tau, sign)
            else:
                sign = (
                    majority_sign(counts)
                    if source.estimator == "majority" and counts is not None
                    else mean_sign(grad_sum)
                )
                value = None
                if plan.mask in ("magnitude", "tensorwise"):
                    value = -grad
                elif plan.mask in ("gate", "confidence") and counts is not None:
                    value = counts.float() / source.num_samples
                masked = apply_mask(
                    plan.mask,
                    tau,
                    sign,
                    value,
                    gamma=plan.gamma,
                    threshold=plan.threshold,
                    scales=scales,
                    inner=whole,
                )
        # once an input is found bad the output is abandoned: keep scanning, stop writing
        if finite.check(target.file_of(name), name, theta) and not finite:
            out = apply_tensor(theta, masked, plan.alpha)
            if count_nonfinite(out):
                overflow.append(f"{name!r} ({theta.dtype})")
            if not overflow:
                writer.write(name, out)
        same = torch.sign(masked) * torch.sign(tau)
        kept += int((same > 0).sum())
        flipped += int((same < 0).sum())
        numel += tau.numel()
        if grad is not None:
            inner += float(torch.sum(grad * masked, dtype=torch.float64)) * plan.alpha
    return TensorDescent(name, numel, kept, flipped, inner)


def _magnitude_scales(
    name: str,
    base: CheckpointReader,
    finetuned: CheckpointReader,
    source: VoteSource | None,
    slices: Sequence[tuple[int, int]],
) -> tuple[float, float]:
    """Root-mean-square of ``τ_A`` and of the mean anti-gradient over the whole tensor (first pass)."""
    assert source is not None
    tau_sq = ref_sq = 0.0
    count = 0
    for start, stop in slices:
        tau = finetuned.rows(name, start, stop).double() - base.rows(name, start, stop).double()
        _, grad_sum = source.rows(name, start, stop)
        tau_sq += float(tau.pow(2).sum())
        ref_sq += float((grad_sum / max(source.num_samples, 1)).pow(2).sum())
        count += tau.numel()
    return math.sqrt(tau_sq / max(count, 1)), math.sqrt(ref_sq / max(count, 1))


def _descent_inner(
    name: str,
    base: CheckpointReader,
    finetuned: CheckpointReader,
    source: VoteSource | None,
    slices: Sequence[tuple[int, int]],
) -> float:
    """``⟨−ḡ, τ_A⟩`` of the whole tensor, summed in float64 over its slices (first pass)."""
    assert source is not None
    total = 0.0
    for start, stop in slices:
        tau = finetuned.rows(name, start, stop).float() - base.rows(name, start, stop).float()
        _, grad_sum = source.rows(name, start, stop)
        reference = -(grad_sum / max(source.num_samples, 1))
        total += float(torch.sum(tau.to(torch.float64) * reference.to(torch.float64)))
    return total


def record_settings(plan: MaskPlan) -> dict[str, Any]:
    """The mask settings as recorded in ``gradfix.json``."""
    return {
        "mask": plan.mask,
        "alpha": plan.alpha,
        "gamma": plan.gamma,
        "threshold": plan.threshold,
        "unvoted": plan.unvoted,
    }
