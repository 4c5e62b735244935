"""The descent report of votes that kept no gradient sums: ``⟨ḡ_T, mask(τ_T)⟩`` from one backward.

Majority votes taken with ``gradient="none"`` hold only their counts (at most 2 bytes per voting
parameter). The record's first-order descent figure ``⟨ḡ, α · mask(τ_A)⟩`` (Eq. 6) then comes
from one more batched backward of the summed loss over the same batches
(:func:`gradfix.votes.summed.summed_gradients`): as each tensor's gradient arrives, its inner
product with that tensor's masked update (the same :func:`~gradfix.masking.masked_rows` that
writes the output) is added up, and the gradient is dropped. Exact for the mean gradient up to
the order of float additions; no model-sized gradient is ever held.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from gradfix.data import batched
from gradfix.diagnostics import DescentReport
from gradfix.jobs.common import Shots, align_names
from gradfix.masking import TauRows, VoteReference
from gradfix.masking.apply import masked_rows
from gradfix.ops.masks import Mask, MaskOptions, get_mask
from gradfix.ops.reductions import ordered_dot
from gradfix.recipes.base import place_batch
from gradfix.settings import VoteSettings
from gradfix.votes.distributed import world
from gradfix.votes.estimate import Gradient
from gradfix.votes.summed import summed_gradients


@dataclass
class PendingDescent:
    """What the extra backward needs: the target's model, its recipe and the voting shots."""

    model: nn.Module
    recipe: Any
    shots: Shots
    settings: VoteSettings
    checkpoint_names: Sequence[str]


def vote_gradient(mask: str, saved: bool) -> Gradient:
    """What a transport's vote keeps of the gradient: its sum only where something reads it later.

    Kept (``"sum"``) for a mask that reads ``−ḡ`` (``magnitude``, ``tensorwise``), for votes
    that are saved or added to saved ones (``saved``: ``--votes-out``, ``--votes-in``), and under
    torchrun (the processes' sums are added); otherwise ``"none"``: the vote holds its counts
    only and the descent report comes from :func:`descent_inner`.
    """
    if get_mask(mask).reads == "value" or saved or world()[1] > 1:
        return "sum"
    return "none"


def descent_inner(
    pending: PendingDescent,
    tau: TauRows,
    shapes: Mapping[str, tuple[int, ...]],
    names: Sequence[str],
    reference: VoteReference,
    mask: Mask,
    options: MaskOptions,
    keep_unvoted: bool,
) -> dict[str, float]:
    """``{checkpoint name: ⟨ḡ_T, mask(τ_T)⟩}`` (before α) for the tensors ``names`` the votes cover.

    ``ḡ`` is the gradient of the mean loss over the voting shots, batched as when voting; a tensor
    that no batch's loss reaches has inner product 0.
    """
    model_names = [n for n, _ in pending.model.named_parameters()]
    mapping = align_names(model_names, pending.checkpoint_names)
    wanted = {n for n in names if reference.covers(n)}
    inner = dict.fromkeys(names, 0.0)

    def consume(model_name: str, grad: Any) -> None:
        name = mapping.get(model_name)
        if name not in wanted:
            return
        assert name is not None
        shape = tuple(shapes[name])
        for rows in masked_rows(name, shape, tau, reference, mask, options, keep_unvoted):
            part = grad if grad.dim() == 0 else grad[rows.start : rows.stop]
            inner[name] += ordered_dot(part, rows.update)

    recipe, settings = pending.recipe, pending.settings
    batches = [
        place_batch(recipe.collate(c), pending.model)
        for c in batched(pending.shots.drawn, settings.batch_size)
    ]
    samples = summed_gradients(pending.model, batches, recipe.loss, consume)
    return {n: v / max(samples, 1) for n, v in inner.items()}


def with_inner(report: DescentReport | None, inner: Mapping[str, float] | None) -> DescentReport | None:
    """``report`` with each tensor's ``⟨ḡ, Δ⟩`` taken from ``inner`` (times the report's α)."""
    if report is None or inner is None:
        return report
    rows = [replace(t, inner=inner.get(t.name, 0.0) * report.alpha) for t in report.tensors]
    return DescentReport(rows, report.alpha)
