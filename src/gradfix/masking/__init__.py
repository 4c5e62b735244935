"""Transport of a task vector onto a new base: ``θ_B^new = θ_B + α · (m ⊙ τ_A)`` (Eq. 5).

:func:`mask_task_vector` and :func:`transport` are the in-memory API; the checkpoint jobs stream
the same path (:func:`~gradfix.masking.apply.masked_rows`) slice by slice, so both give the same
update for every mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, TypedDict, get_args

import torch
from torch import Tensor

from gradfix.checks import check_same_architecture
from gradfix.errors import ConfigError
from gradfix.masking.apply import (
    MaskedRows,
    TauRows,
    TensorTally,
    masked_rows,
    uncovered_tensors,
    unvoted_error,
)
from gradfix.masking.references import Reference, TensorReference, VoteReference, as_reference
from gradfix.ops.masks import MASKS, MaskOptions, get_mask, seeded_generator
from gradfix.settings import DEFAULT_GAMMA, DEFAULT_THRESHOLD, Unvoted
from gradfix.task_vector import TaskVector
from gradfix.votes import SignVotes

if TYPE_CHECKING:
    from typing_extensions import Unpack

ReferenceLike = SignVotes | TaskVector | Mapping[str, Tensor]
"""What a mask compares ``τ_A`` against: the target's votes ``ŝ`` (GradFix), the target's own task
vector ``τ_B`` (the oracle), or a plain ``{name: sign tensor}`` mapping."""

MASK_CHOICES = tuple(MASKS)
UNVOTED_POLICIES = get_args(Unvoted)


def reference_signs(reference: ReferenceLike) -> dict[str, Tensor]:
    """The int8 sign tensors in {−1, 0, 1} of a reference.

    ``SignVotes`` → the estimate ``ŝ`` (its estimator decides how); a ``TaskVector`` (oracle) →
    ``sign(τ_B)``; a mapping of tensors → their signs.
    """
    if isinstance(reference, SignVotes):
        return reference.sign()
    return {n: torch.sign(t).to(torch.int8) for n, t in reference.items()}


def check_unvoted(unvoted: str) -> None:
    """Raise a :class:`ConfigError` for an unknown unvoted policy."""
    if unvoted not in UNVOTED_POLICIES:
        choices = ", ".join(UNVOTED_POLICIES)
        raise ConfigError(f"unknown unvoted policy {unvoted!r}; choose one of {choices}")


def mask_task_vector(
    tau: Mapping[str, Tensor],
    reference: ReferenceLike | None,
    mask: str = "agreement",
    *,
    gamma: float = DEFAULT_GAMMA,
    seed: int = 0,
    unvoted: str = "error",
    threshold: float = DEFAULT_THRESHOLD,
) -> TaskVector:
    """Mask every tensor of ``τ_A`` against a reference: ``m ⊙ τ_A`` (or the strategy's ``τ'``).

    ``mask`` is a registered mask (:data:`gradfix.ops.masks.MASKS`): ``agreement`` (GradFix,
    Eq. 4), ``forcing`` (Eq. 11), ``magnitude`` (Eq. 12, ``gamma``), ``random`` (ablation,
    seeded per tensor from ``seed`` and its name), ``gate`` (drop only where the votes oppose
    ``τ_A``'s sign by a margin of at least ``threshold``), ``confidence`` (weight by the share of
    agreeing votes), ``tensorwise`` (per tensor: ``τ_T`` whole if ``⟨−ḡ_T, τ_T⟩ > 0``, else the
    agreement mask) or ``none`` (naive transport: ``τ_A`` unchanged, no reference needed).

    ``unvoted`` says what happens to a tensor of ``τ_A`` that the reference does not cover (not in
    it, or, for votes, a tensor that received no gradient): ``error`` (default) raises one error
    listing them, ``drop`` zeroes them (what a zero vote means), ``keep`` passes them through
    unmasked. Tensors of ``τ_A`` that are all zero are never a problem.
    """
    chosen = get_mask(mask)
    check_unvoted(unvoted)
    if chosen.needs_reference and reference is None:
        raise ConfigError(f"the {mask!r} mask needs a reference (sign votes or an oracle task vector)")
    source = as_reference(reference) if reference is not None and chosen.needs_reference else None
    if source is not None:
        covered = [n for n in tau if source.covers(n)]
        check_same_architecture(
            {
                "task vector": {n: tuple(tau[n].shape) for n in covered},
                "reference": {n: source.shape(n) for n in covered},
            },
            covered,
        )
        nonzero = [n for n in tau if bool(tau[n].ne(0).any())]
        uncovered = uncovered_tensors(list(tau), nonzero, source)
        if uncovered and unvoted == "error":
            raise unvoted_error(uncovered)
    options = MaskOptions(gamma=gamma, threshold=threshold, seed=seed)
    rows = TauRows(tensors=tau)
    out: dict[str, Tensor] = {}
    for name, t in tau.items():
        (whole,) = masked_rows(name, tuple(t.shape), rows, source, chosen, options, unvoted == "keep", None)
        out[name] = whole.update
    return TaskVector(out)


class MaskKeywords(TypedDict, total=False):
    """The keyword arguments of :func:`mask_task_vector` that :func:`transport` passes on."""

    gamma: float
    seed: int
    unvoted: str
    threshold: float


def transport(
    target_state_dict: Mapping[str, Tensor],
    tau: Mapping[str, Tensor],
    reference: ReferenceLike | None,
    alpha: float = 1.0,
    mask: str = "agreement",
    **mask_options: Unpack[MaskKeywords],
) -> dict[str, Tensor]:
    """``θ_B^new = θ_B + α · (m ⊙ τ_A)`` (Eq. 5): a new state dict for the target.

    ``reference`` is the target's :class:`SignVotes` (GradFix) or its own task vector (the
    oracle); ``mask`` and ``mask_options`` (``gamma``, ``seed``, ``unvoted``, ``threshold``) are
    those of :func:`mask_task_vector`. Tensors of the target outside ``τ_A`` are passed through
    unchanged.
    """
    masked = mask_task_vector(tau, reference, mask, **mask_options)
    return masked.apply_to(target_state_dict, alpha)


__all__ = [
    "MASK_CHOICES",
    "UNVOTED_POLICIES",
    "MaskedRows",
    "Reference",
    "ReferenceLike",
    "TauRows",
    "TensorReference",
    "TensorTally",
    "VoteReference",
    "as_reference",
    "check_unvoted",
    "mask_task_vector",
    "masked_rows",
    "reference_signs",
    "seeded_generator",
    "transport",
    "uncovered_tensors",
    "unvoted_error",
]
