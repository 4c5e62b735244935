"""Transport of a task vector onto a new base: ``θ_B^new = θ_B + α · (m ⊙ τ_A)`` (Eq. 5)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import Tensor

from gradfix.checks import check_same_architecture
from gradfix.errors import ConfigError, GradfixError
from gradfix.ops.masks import MASKS, apply_mask
from gradfix.task_vector import TaskVector
from gradfix.votes import SignVotes

Reference = SignVotes | TaskVector | Mapping[str, Tensor]
"""What a mask compares ``τ_A`` against: the target's votes ``ŝ`` (GradFix), the target's own task
vector ``τ_B`` (the oracle), or a plain ``{name: sign tensor}`` mapping."""

MASK_CHOICES = ("none", *MASKS)
UNVOTED_POLICIES = ("error", "drop", "keep")


def reference_signs(reference: Reference) -> dict[str, Tensor]:
    """The int8 sign tensors in {−1, 0, 1} of a reference.

    ``SignVotes`` → the estimate ``ŝ`` (its estimator decides how); a ``TaskVector`` (oracle) →
    ``sign(τ_B)``; a mapping of tensors → their signs.
    """
    if isinstance(reference, SignVotes):
        return reference.sign()
    return {n: torch.sign(t).to(torch.int8) for n, t in reference.items()}


def reference_values(reference: Reference) -> dict[str, Tensor]:
    """The real-valued reference of the magnitude-scaled and tensorwise masks.

    ``SignVotes`` → the mean anti-gradient ``−ḡ``; a task vector (oracle ``τ_B``) → itself; a
    mapping → its tensors as float.
    """
    if isinstance(reference, SignVotes):
        return {n: -g for n, g in reference.mean_gradient().items()}
    return {n: t.to(torch.float32) if not t.is_floating_point() else t for n, t in reference.items()}


def reference_margins(reference: Reference) -> dict[str, Tensor]:
    """Vote margins ``μ = v / n`` in [−1, 1] (gate and confidence masks).

    Majority votes → their vote sums over the sample count; mean-estimator votes and oracle task
    vectors → their signs (a unanimous vote).
    """
    if isinstance(reference, SignVotes) and reference.counts and reference.num_samples:
        n = float(reference.num_samples)
        return {name: c.to(torch.float32) / n for name, c in reference.counts.items()}
    return {n: s.to(torch.float32) for n, s in reference_signs(reference).items()}


def seeded_generator(seed: int, name: str) -> torch.Generator:
    """The random generator of tensor ``name``: seeded from ``seed`` and the name, so that a tensor's
    random draw does not depend on which other tensors are processed, or in which order."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def mask_task_vector(
    tau: Mapping[str, Tensor],
    reference: Reference | None,
    mask: str = "agreement",
    *,
    gamma: float = 1.0,
    seed: int = 0,
    unvoted: str = "error",
    threshold: float = 0.3,
) -> TaskVector:
    """Mask every tensor of ``τ_A`` against a reference: ``m ⊙ τ_A`` (or the strategy's ``τ'``).

    ``mask`` is one of ``agreement`` (GradFix, Eq. 4), ``forcing`` (Eq. 11), ``magnitude``
    (Eq. 12), ``random`` (ablation, seeded per tensor from ``seed`` and its name), ``gate``
    (drop only where the votes oppose ``τ_A``'s sign by a margin of at least ``threshold``),
    ``confidence`` (weight by the share of agreeing votes), ``tensorwise`` (per tensor:
    ``τ'_T = τ_T if ⟨−ḡ_T, τ_T⟩ > 0 else m_T ⊙ τ_T``, with ``−ḡ`` the mean anti-gradient of the
    votes, or ``τ_B`` for an oracle reference, and ``m`` the agreement mask) or ``none`` (naive
    transport: ``τ_A`` unchanged, no reference needed).

    ``unvoted`` says what happens to a tensor of ``τ_A`` that the reference does not cover (not in
    it, or, for votes, a tensor that received no gradient): ``error`` (default) raises one error
    listing them, ``drop`` zeroes them (what a zero vote means), ``keep`` passes them through
    unmasked. Tensors of ``τ_A`` that are all zero are never a problem.
    """
    if mask not in MASK_CHOICES:
        raise ConfigError(f"unknown mask {mask!r}; choose one of {', '.join(MASK_CHOICES)}")
    if unvoted not in UNVOTED_POLICIES:
        choices = ", ".join(UNVOTED_POLICIES)
        raise ConfigError(f"unknown unvoted policy {unvoted!r}; choose one of {choices}")
    if mask == "none":
        return TaskVector(dict(tau))
    if reference is None:
        raise ConfigError(f"the {mask!r} mask needs a reference (sign votes or an oracle task vector)")
    signs = reference_signs(reference)
    if mask in ("magnitude", "tensorwise"):
        values = reference_values(reference)
    elif mask in ("gate", "confidence"):
        values = reference_margins(reference)
    else:
        values = {}
    silent = set(reference.untouched()) if isinstance(reference, SignVotes) else set()
    covered = [n for n in tau if n in signs and n not in silent]
    check_same_architecture(
        {
            "task vector": {n: tuple(tau[n].shape) for n in covered},
            "reference": {n: tuple(signs[n].shape) for n in covered},
        },
        covered,
    )
    uncovered = [n for n in tau if n not in covered and bool(tau[n].ne(0).any())]
    if uncovered and unvoted == "error":
        more = f" and {len(uncovered) - 10} more" if len(uncovered) > 10 else ""
        shown = ", ".join(uncovered[:10]) + more
        raise GradfixError(
            f"{len(uncovered)} tensor(s) of the task vector have no votes from the target "
            f"(frozen, unused by the loss, or missing from the reference): {shown}. Exclude them "
            "from the task vector (--exclude), or set unvoted (--unvoted) to 'drop' to zero them or 'keep' "
            "to add them unmasked."
        )
    out: dict[str, Tensor] = {}
    for name, t in tau.items():
        if name in covered:
            generator = seeded_generator(seed, name) if mask == "random" else None
            out[name] = apply_mask(
                mask, t, signs[name], values.get(name), gamma=gamma, generator=generator, threshold=threshold
            )
        elif unvoted == "keep":
            out[name] = t
        else:
            out[name] = torch.zeros_like(t)
    return TaskVector(out)


def transport(
    target_state_dict: Mapping[str, Tensor],
    tau: Mapping[str, Tensor],
    reference: Reference | None,
    alpha: float = 1.0,
    mask: str = "agreement",
    **mask_options: object,
) -> dict[str, Tensor]:
    """``θ_B^new = θ_B + α · (m ⊙ τ_A)`` (Eq. 5): a new state dict for the target.

    ``reference`` is the target's :class:`SignVotes` (GradFix) or its own task vector (the
    oracle); ``mask`` and ``mask_options`` (``gamma``, ``seed``, ``unvoted``) are those of
    :func:`mask_task_vector`. Tensors of the target outside ``τ_A`` are passed through unchanged.
    """
    masked = mask_task_vector(tau, reference, mask, **mask_options)  # type: ignore[arg-type]
    return masked.apply_to(target_state_dict, alpha)
