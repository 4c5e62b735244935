"""What a mask compares ``τ_A`` against, read tensor by tensor in row slices.

A reference is the target's sign votes (GradFix: in memory, in saved votes files, or both, added
up) or a mapping of tensors (the oracle ``τ_B``, or plain sign tensors). Both give, for any rows
of a tensor, a :class:`~gradfix.ops.masks.ReferenceRows` (sign, real values, vote margins) and,
for votes, the mean gradient ``ḡ`` of those rows (the descent report's), when the votes kept
their gradient sums (majority votes taken with ``gradient="none"`` hold counts only: their rows
carry no real values and no ``ḡ``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from gradfix.checks import FiniteCheck, check_same_architecture
from gradfix.errors import ConfigError
from gradfix.io import CheckpointReader, open_checkpoint
from gradfix.ops.masks import ReferenceRows
from gradfix.ops.signs import majority_sign, mean_sign
from gradfix.votes import SignVotes
from gradfix.votes.file import (
    COUNTS_PREFIX,
    GRAD_SUM_PREFIX,
    VotesHeader,
    check_counts_range,
    read_votes_header,
)


def _rows(t: Tensor, start: int, stop: int) -> Tensor:
    return t if t.dim() == 0 else t[start:stop]


def _as_sum(g: Tensor) -> Tensor:
    """A gradient sum in float32 or float64 (half-precision sums are widened)."""
    return g if g.dtype in (torch.float32, torch.float64) else g.float()


class Reference(Protocol):
    """Rows of a reference, tensor by tensor."""

    def covers(self, name: str) -> bool:
        """Whether the reference has ``name`` (for votes: and a sample gave it a gradient)."""

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name``."""

    def rows(self, name: str, start: int, stop: int) -> tuple[ReferenceRows, Tensor | None]:
        """The reference of rows ``start:stop`` and their mean gradient ``ḡ`` (``None`` if not votes)."""


class TensorReference:
    """A mapping of tensors as a reference: the oracle ``τ_B`` or ``{name: sign tensor}``.

    ``sign = sign(t)``, ``value = t`` (as float), ``margin = sign`` (a unanimous vote).
    """

    def __init__(self, tensors: Mapping[str, Tensor]):
        self.tensors = tensors

    def covers(self, name: str) -> bool:
        """Whether ``name`` is in the mapping."""
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name``."""
        return tuple(self.tensors[name].shape)

    def rows(self, name: str, start: int, stop: int) -> tuple[ReferenceRows, Tensor | None]:
        """Sign, values and margins of rows ``start:stop``; no gradient."""
        t = _rows(self.tensors[name], start, stop)
        sign = torch.sign(t).to(torch.int8)
        value = t if t.is_floating_point() else t.to(torch.float32)
        return ReferenceRows(sign, value, sign.to(torch.float32)), None


class VoteReference:
    """Votes in memory and in saved votes files, added up, readable in row slices.

    Files are read lazily (headers only until a slice is asked for). Every source must hold the
    same tensors with the same shapes; ``estimator`` decides how a slice becomes a sign:
    ``majority`` (the sign of the vote sums, Eq. 9) or ``mean`` (the sign of ``−Σ g``).
    """

    def __init__(
        self, votes: Sequence[SignVotes], files: Sequence[str | Path] = (), estimator: str | None = None
    ):
        self.votes = list(votes)
        self.readers: list[CheckpointReader] = []
        self.headers: list[VotesHeader] = []
        self.estimator = estimator or (self.votes[0].estimator if self.votes else "majority")
        self.num_samples = sum(v.num_samples for v in self.votes)
        self.hits: dict[str, int] = {}
        self.has_counts = all(bool(v.counts) for v in self.votes)
        self.has_gradient = all(v.has_gradient for v in self.votes)
        shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        for i, v in enumerate(self.votes):
            shapes[f"votes {i + 1}"] = v.shapes()
            for n, h in v.hits.items():
                self.hits[n] = self.hits.get(n, 0) + h
        for path in files:
            shapes[str(path)] = self._open(path)
        if not shapes:
            raise ConfigError("no votes were given")
        check_same_architecture(shapes)
        self.shapes = next(iter(shapes.values()))
        if self.estimator == "majority" and not self.has_counts:
            raise ConfigError("the majority estimator needs vote counts; these votes were taken with 'mean'")
        if self.estimator == "mean" and not self.has_gradient:
            raise ConfigError("the mean estimator needs gradient sums; some of these votes kept counts only")
        self._finite = FiniteCheck()

    def _open(self, path: str | Path) -> dict[str, tuple[int, ...]]:
        reader = open_checkpoint(path)
        self.readers.append(reader)
        header = read_votes_header(reader, path, check_counts=False)  # counts are checked as read
        self.headers.append(header)
        self.num_samples += header.num_samples
        for n, h in header.hits.items():
            self.hits[n] = self.hits.get(n, 0) + h
        self.has_counts = self.has_counts and header.has_counts
        self.has_gradient = self.has_gradient and header.has_gradient
        return dict(header.shapes)

    def covers(self, name: str) -> bool:
        """Whether ``name`` was voted on and received a gradient from at least one sample."""
        return name in self.shapes and self.hits.get(name, 0) > 0

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name``."""
        return self.shapes[name]

    def sums(self, name: str, start: int, stop: int) -> tuple[Tensor | None, Tensor | None]:
        """Summed vote counts (int64; ``None`` without counts) and gradient sums (float32/64;
        ``None`` when some source kept no gradient sums) of some rows."""
        counts: Tensor | None = None
        grad: Tensor | None = None
        for v in self.votes:
            if self.has_gradient:
                g = _as_sum(_rows(v.grad_sum[name], start, stop))
                grad = g if grad is None else grad + g
            if self.has_counts:
                c = _rows(v.counts[name], start, stop).long()
                counts = c if counts is None else counts + c
        for reader, header in zip(self.readers, self.headers, strict=True):
            if self.has_gradient:
                g = reader.rows(f"{GRAD_SUM_PREFIX}{name}", start, stop)
                if not self._finite.check(reader.path, f"{GRAD_SUM_PREFIX}{name}", g):
                    self._finite.raise_if_any("the votes file is corrupted")
                grad = _as_sum(g) if grad is None else grad + _as_sum(g)
            if self.has_counts:
                c = reader.rows(f"{COUNTS_PREFIX}{name}", start, stop)
                check_counts_range(header, name, c)
                counts = c.long() if counts is None else counts + c.long()
        return counts, grad

    def rows(self, name: str, start: int, stop: int) -> tuple[ReferenceRows, Tensor | None]:
        """The estimate ``ŝ``, ``−ḡ``, the margins ``v / n`` of rows ``start:stop``, and ``ḡ``
        (``−ḡ`` and ``ḡ`` are ``None`` for votes without gradient sums)."""
        counts, grad_sum = self.sums(name, start, stop)
        gradient = grad_sum / max(self.num_samples, 1) if grad_sum is not None else None
        if self.estimator == "majority" and counts is not None:
            sign = majority_sign(counts)
        else:
            assert grad_sum is not None  # the mean estimator needs the sums (checked when made)
            sign = mean_sign(grad_sum)
        margin = counts.float() / self.num_samples if counts is not None and self.num_samples else None
        value = -gradient if gradient is not None else None
        return ReferenceRows(sign, value, margin), gradient

    def close(self) -> None:
        """Release the votes files."""
        for reader in self.readers:
            reader.close()


def check_values(reference: Reference | None, mask: str, reads: str) -> None:
    """Raise a :class:`ConfigError` when a mask reads ``−ḡ`` and the votes kept no gradient sums."""
    if reads == "value" and isinstance(reference, VoteReference) and not reference.has_gradient:
        raise ConfigError(
            f"the {mask!r} mask reads the mean gradient, and these votes kept no gradient sums "
            "(taken with gradient='none'); vote with gradient='sum'"
        )


def as_reference(reference: SignVotes | Mapping[str, Tensor] | Reference) -> Reference:
    """A :class:`SignVotes` or a mapping of tensors as a :class:`Reference` (others pass through)."""
    if isinstance(reference, SignVotes):
        return VoteReference([reference], estimator=reference.estimator)
    if isinstance(reference, Mapping):
        return TensorReference(reference)
    return reference
