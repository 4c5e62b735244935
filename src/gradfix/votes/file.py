"""The votes file: one safetensors file holding a :class:`~gradfix.votes.SignVotes`.

This module is the only one that knows the format:

- tensors ``grad_sum/<name>`` (``Σ_j g^(j)``, floating point) and ``counts/<name>``
  (``Σ_j sign(−g^(j))``, an integer dtype, same shape), each for every tensor voted on or for
  none: a ``majority`` file may hold counts only (votes taken with ``gradient="none"``), a
  ``mean`` file needs the gradient sums, and counts without gradient sums need the majority
  estimator's counts for every tensor;
- header metadata ``gradfix_kind`` (:data:`VOTES_KIND`), ``num_samples`` (a positive
  integer), ``estimator`` (``majority`` or ``mean``) and ``hits`` (JSON ``{name: samples}``, each
  at most ``num_samples``).

:func:`read_votes_header` checks a file's header (and that no vote count exceeds the number of
samples); :func:`validate_votes_files` checks files without loading them, :func:`load_votes`
loads them with the same checks. Every refusal is a one-line
:class:`~gradfix.errors.CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast, get_args

import torch
from safetensors.torch import save_file
from torch import Tensor

from gradfix.checks import FiniteCheck, check_same_architecture
from gradfix.errors import CheckpointError, ConfigError
from gradfix.io import CheckpointReader, open_checkpoint
from gradfix.settings import Estimator

if TYPE_CHECKING:
    from gradfix.votes.estimate import SignVotes

VOTES_KIND = "gradfix.sign_votes"
"""Value of the ``gradfix_kind`` header entry of a votes file."""
GRAD_SUM_PREFIX = "grad_sum/"
"""Prefix of the gradient-sum tensors: ``grad_sum/<name>``."""
COUNTS_PREFIX = "counts/"
"""Prefix of the vote-count tensors: ``counts/<name>``."""
MAX_SAMPLES = 2**62
"""Largest ``num_samples`` a votes file may claim."""

_COUNT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_SLICE_BYTES = 4 * 2**20
_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class VotesHeader:
    """What a votes file's header says: samples, estimator, hits and the tensors voted on.

    ``shapes`` are those of the voted tensors (by tensor name, without the prefix: the
    ``grad_sum`` tensors, or the ``counts`` of a file without gradient sums); ``has_counts`` says
    whether the file holds vote counts (needed by the majority estimator), ``has_gradient``
    whether it holds gradient sums (needed by the mean estimator and the mean gradient).
    """

    path: Path
    num_samples: int
    estimator: Estimator
    hits: dict[str, int]
    has_counts: bool
    shapes: dict[str, tuple[int, ...]]
    has_gradient: bool = True


def _invalid(path: str | Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a valid gradfix votes file ({problem})")


def read_votes_header(
    reader: CheckpointReader, path: str | Path | None = None, *, check_counts: bool = True
) -> VotesHeader:
    """Read and check the header of an open votes file (``path`` names it in messages).

    Refused with a :class:`CheckpointError`: a file that is not a votes file, a malformed header
    (``num_samples`` not a positive integer up to :data:`MAX_SAMPLES`, an unknown estimator,
    ``hits`` not a mapping of voted tensor to an integer from 0 to ``num_samples``), a
    ``grad_sum`` that is not floating point, vote counts missing for some tensors, shaped unlike
    their gradient sums or not of an integer dtype, and (``check_counts``, read slice by slice)
    counts whose absolute value exceeds ``num_samples``.
    """
    path = Path(path) if path is not None else reader.path
    meta = reader.metadata()
    if meta.get("gradfix_kind") != VOTES_KIND:
        raise _invalid(path, f"no gradfix_kind={VOTES_KIND} header")
    num_samples = _num_samples(path, meta)
    estimator = meta.get("estimator")
    if estimator is None:
        raise _invalid(path, "no estimator in its header")
    if estimator not in get_args(Estimator):
        choices = ", ".join(get_args(Estimator))
        raise _invalid(path, f"estimator {_short(estimator)} is not one of {choices}")
    shapes, dtypes = reader.shapes(), reader.dtypes()
    grads = {k[len(GRAD_SUM_PREFIX) :]: s for k, s in shapes.items() if k.startswith(GRAD_SUM_PREFIX)}
    counts = {k[len(COUNTS_PREFIX) :]: s for k, s in shapes.items() if k.startswith(COUNTS_PREFIX)}
    for name in grads:
        dtype = dtypes[GRAD_SUM_PREFIX + name]
        if not dtype.is_floating_point:
            raise _invalid(path, f"tensor {GRAD_SUM_PREFIX + name!r} is {dtype}, not floating point")
    has_gradient = bool(grads) or not counts
    if not has_gradient and estimator == "mean":
        raise _invalid(path, "the mean estimator needs gradient sums, and the file holds vote counts only")
    voted = grads if has_gradient else counts
    hits = _hits(path, meta, num_samples, voted, GRAD_SUM_PREFIX if has_gradient else COUNTS_PREFIX)
    has_counts = bool(counts) or estimator == "majority"
    if has_counts:
        _check_count_tensors(path, voted, counts, dtypes)
    header = VotesHeader(path, num_samples, cast(Estimator, estimator), hits, has_counts, voted, has_gradient)
    if has_counts and check_counts:
        for name, shape in voted.items():
            key = COUNTS_PREFIX + name
            if _counts_fit(dtypes[key], num_samples):
                continue
            for start, stop in _row_ranges(shape, dtypes[key].itemsize):
                check_counts_range(header, name, reader.rows(key, start, stop))
    return header


def _num_samples(path: Path, meta: Mapping[str, str]) -> int:
    if "num_samples" not in meta:
        raise _invalid(path, "no num_samples in its header")
    text = meta["num_samples"]
    if not _DIGITS.fullmatch(text):
        raise _invalid(path, f"num_samples {_short(text)} is not a non-negative integer")
    digits = text.lstrip("0")
    if not digits:
        raise _invalid(path, f"num_samples {_short(text)} is zero; a votes file counts at least one sample")
    if len(digits) > 20 or int(digits) > MAX_SAMPLES:
        raise _invalid(path, f"num_samples {_short(text)} is larger than 2**62")
    return int(digits)


def _hits(
    path: Path, meta: Mapping[str, str], num_samples: int, grads: Mapping[str, object], prefix: str
) -> dict[str, int]:
    try:
        raw = json.loads(meta.get("hits", "{}"))
    except ValueError as exc:
        raise _invalid(path, f"hits is not JSON: {str(exc).splitlines()[0]}") from exc
    if not isinstance(raw, dict):
        raise _invalid(path, f"hits is a {type(raw).__name__}, not a mapping of tensor name to sample count")
    hits: dict[str, int] = {}
    for name, value in raw.items():
        if name not in grads:
            raise _invalid(
                path,
                f"hits names {_short(name)}, which is not a voted tensor (no {prefix + name!r})",
            )
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= num_samples:
            raise _invalid(
                path,
                f"hits of {name!r} is {_short(value)}, not an integer from 0 to num_samples ({num_samples})",
            )
        hits[name] = value
    return hits


def _check_count_tensors(
    path: Path,
    grads: Mapping[str, tuple[int, ...]],
    counts: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, torch.dtype],
) -> None:
    for name in counts:
        if name not in grads:
            raise _invalid(path, f"tensor {COUNTS_PREFIX + name!r} has no {GRAD_SUM_PREFIX + name!r}")
    for name, shape in grads.items():
        if name not in counts:
            raise _invalid(path, f"tensor {name!r} has no vote counts ({COUNTS_PREFIX + name!r} is missing)")
        if counts[name] != shape:
            raise _invalid(
                path,
                f"the counts of tensor {name!r} have shape {list(counts[name])}, "
                f"its gradient sum {list(shape)}",
            )
        dtype = dtypes[COUNTS_PREFIX + name]
        if dtype not in _COUNT_DTYPES:
            raise _invalid(path, f"the counts of tensor {name!r} are {dtype}, not an integer dtype")


def _counts_fit(dtype: torch.dtype, num_samples: int) -> bool:
    """Whether every value of ``dtype`` is within ``±num_samples`` (nothing to read)."""
    info = torch.iinfo(dtype)
    return max(info.max, -info.min) <= num_samples


def check_counts_range(header: VotesHeader, name: str, counts: Tensor) -> None:
    """Raise if some vote count of ``name`` (all or some rows of it) exceeds ``±num_samples``."""
    if counts.numel() == 0:
        return
    largest = max(int(counts.max()), -int(counts.min()))  # Python ints: no overflow at int64's minimum
    if largest > header.num_samples:
        raise _invalid(
            header.path,
            f"the counts of tensor {name!r} reach {largest}, more than num_samples ({header.num_samples})",
        )


def _row_ranges(shape: Sequence[int], itemsize: int, budget: int = _SLICE_BYTES) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` row ranges of about ``budget`` bytes (a 0-d tensor is one range)."""
    if not shape:
        yield 0, 1
        return
    step = max(1, budget // max(1, math.prod(shape[1:]) * itemsize))
    for start in range(0, shape[0], step):
        yield start, min(shape[0], start + step)


def _short(value: object, limit: int = 60) -> str:
    """``repr`` of a header value, on one line and at most about ``limit`` characters."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "…"


# -- whole files --------------------------------------------------------------------------------
def write_votes(votes: SignVotes, path: str | Path) -> Path:
    """Write ``votes`` to one safetensors file at ``path`` (see the module docstring)."""
    path = Path(path)
    tensors = {GRAD_SUM_PREFIX + n: g.contiguous() for n, g in votes.grad_sum.items()}
    tensors.update({COUNTS_PREFIX + n: c.contiguous() for n, c in votes.counts.items()})
    meta = {
        "format": "pt",
        "gradfix_kind": VOTES_KIND,
        "num_samples": str(votes.num_samples),
        "estimator": votes.estimator,
        "hits": json.dumps(votes.hits),
    }
    save_file(tensors, str(path), metadata=meta)
    return path


def read_votes(path: str | Path) -> SignVotes:
    """Load a votes file written by :func:`write_votes`, checked like :func:`read_votes_header`."""
    from gradfix.votes.estimate import SignVotes

    path = Path(path)
    with open_checkpoint(path) as reader:
        header = read_votes_header(reader, path, check_counts=False)
        grad_sum = {n: reader.get(GRAD_SUM_PREFIX + n) for n in header.shapes} if header.has_gradient else {}
        counts = {n: reader.get(COUNTS_PREFIX + n) for n in header.shapes} if header.has_counts else {}
    for name, tensor in counts.items():
        check_counts_range(header, name, tensor)
    return SignVotes(counts, grad_sum, header.num_samples, header.estimator, dict(header.hits))


def check_votes_files(paths: Sequence[str | Path]) -> None:
    """Raise if a votes file is missing, or the same file is given twice (its votes would count double).

    Two paths are the same file when they lead to it through links or different spellings.
    """
    seen: dict[tuple[int, int], Path] = {}
    for given in paths:
        path = Path(given)
        if not path.is_file():
            raise CheckpointError(f"{path}: votes file not found")
        stat = os.stat(path)
        identity = (stat.st_dev, stat.st_ino)
        if identity in seen:
            first = seen[identity]
            same = "" if str(first) == str(path) else f" (as {first})"
            raise ConfigError(
                f"{path}: votes file given twice{same} (--votes-in); its votes would count double"
            )
        seen[identity] = path


def validate_votes_files(paths: Sequence[str | Path], tau_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Check saved votes files without loading them: headers, shapes, and finite gradient sums.

    The same checks as :func:`load_votes` (one error per kind of problem, naming the file and the
    tensors), reading the gradient sums and vote counts slice by slice so that memory stays bounded.
    """
    check_votes_files(paths)
    finite = FiniteCheck()
    models: dict[str, dict[str, tuple[int, ...]]] = {}
    for given in paths:
        path = Path(given)
        with open_checkpoint(path) as reader:
            header = read_votes_header(reader, path)
            models[str(path)] = header.shapes
            dtypes = reader.dtypes()
            for name, shape in header.shapes.items() if header.has_gradient else ():
                key = GRAD_SUM_PREFIX + name
                for start, stop in _row_ranges(shape, dtypes[key].itemsize):
                    finite.check(path, name, reader.rows(key, start, stop))
    finite.raise_if_any("the votes file is corrupted")
    _check_architectures(models, tau_shapes)


def load_votes(paths: Sequence[str | Path], tau_shapes: Mapping[str, tuple[int, ...]]) -> list[SignVotes]:
    """Read saved votes files, each checked for NaN/Inf and against ``τ``'s tensor shapes.

    Every file must be present, a valid votes file (:func:`read_votes_header`), hold finite
    gradient sums, and cover the same tensors with the same shapes as the others and as ``τ``
    (one error lists every difference).
    """
    check_votes_files(paths)
    loaded: dict[str, SignVotes] = {}
    finite = FiniteCheck()
    for given in paths:
        votes = read_votes(given)
        for name, tensor in votes.grad_sum.items():
            finite.check(Path(given), name, tensor)
        loaded[str(Path(given))] = votes
    finite.raise_if_any("the votes file is corrupted")
    _check_architectures({label: v.shapes() for label, v in loaded.items()}, tau_shapes)
    return list(loaded.values())


def _check_architectures(
    models: Mapping[str, Mapping[str, tuple[int, ...]]], tau_shapes: Mapping[str, tuple[int, ...]]
) -> None:
    """Votes files of one architecture, sharing tensors with ``τ`` (with ``τ``'s shapes)."""
    if not models:
        return
    check_same_architecture(dict(models))
    path, first = next(iter(models.items()))
    shared = [n for n in first if n in tau_shapes]
    if tau_shapes and not shared:
        raise _foreign(path, first, tau_shapes)
    check_same_architecture(
        {"votes files": {n: first[n] for n in shared}, "task vector": dict(tau_shapes)}, shared
    )


def _foreign(path: str, voted: Mapping[str, object], tau_shapes: Mapping[str, object]) -> CheckpointError:
    """The error for votes that share no tensor name with ``τ``: taken on another model."""
    if not voted:
        return CheckpointError(f"{path}: the votes file holds no voted tensors")
    return CheckpointError(
        f"{path}: none of the votes file's {len(voted)} tensors (e.g. {_short(next(iter(voted)))}) is a "
        f"tensor of the task vector (e.g. {_short(next(iter(tau_shapes)))}); the votes file was taken on "
        "another model (or on tensors that --include/--exclude now leave out)"
    )


__all__ = [
    "COUNTS_PREFIX",
    "GRAD_SUM_PREFIX",
    "MAX_SAMPLES",
    "VOTES_KIND",
    "VotesHeader",
    "check_counts_range",
    "check_votes_files",
    "load_votes",
    "read_votes",
    "read_votes_header",
    "validate_votes_files",
    "write_votes",
]
