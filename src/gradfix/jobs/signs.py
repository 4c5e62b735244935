"""Where a transport's signs come from: B's per-sample votes, or B's own few-shot fine-tune.

``--signs auto`` (the default) keeps the votes unless ``gradfix check``'s verdict, stated from
those votes, is ``weak``: τ_A agrees with B's votes barely above chance, the regime of a release
trained far from A (long, at a large learning rate). There the vote's one-step direction and
B's fine-tune part ways, and the signs of a short fine-tune of B on the same shots
(:func:`gradfix.votes.finetune_signs`) find τ_B's signs far better. The choice of ``(t, α)``
then takes its signs per fold from a fine-tune on the other fold's shots, and the written mask
from a fine-tune on every shot. ``--signs finetune`` asks for it whatever the verdict,
``--signs votes`` never.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from gradfix.data import Example
from gradfix.errors import ConfigError
from gradfix.jobs.common import rename_votes, shot_batches
from gradfix.settings import VoteSettings
from gradfix.votes import SignVotes, finetune_signs
from gradfix.votes.finetune import DEFAULT_LR, DEFAULT_STEPS


def check_signs(votes: VoteSettings, choosing: bool, has_data: bool) -> None:
    """Refuse ``--signs finetune`` where nothing can use it: no choice of ``(t, α)``, or no shots."""
    if votes.signs != "finetune":
        return
    if not choosing:
        raise ConfigError(
            "--signs finetune takes its signs while choosing t and α: use --method adaptive (the "
            "default) or --alpha auto"
        )
    if not has_data:
        raise ConfigError("--signs finetune fine-tunes B on the shots: give --data")


def uses_finetune(votes: VoteSettings, record: Mapping[str, Any]) -> bool:
    """Whether the signs come from a fine-tune: asked for, or ``auto`` with a ``weak`` verdict."""
    verdict = (record.get("check") or {}).get("verdict")
    return votes.signs == "finetune" or (votes.signs == "auto" and verdict == "weak")


def signs_on_shots(
    model: nn.Module,
    recipe: Any,
    shots: Sequence[Example],
    mapping: Mapping[str, str],
    settings: VoteSettings,
) -> SignVotes:
    """The signs of a fine-tune of the target's loaded ``model`` on every shot, keyed by checkpoint
    names (``mapping``: model parameter name → checkpoint name); the model is unchanged afterwards."""
    batches = shot_batches(recipe, model, shots, settings.batch_size)
    return rename_votes(finetune_signs(model, batches, recipe.loss, seed=settings.seed), mapping)


def signs_record(votes: VoteSettings) -> dict[str, Any]:
    """``gradfix.json``'s ``"signs"`` when they come from a fine-tune."""
    why = (
        "asked for (--signs finetune)" if votes.signs == "finetune" else "the verdict is weak (--signs auto)"
    )
    return {"from": "finetune", "steps": DEFAULT_STEPS, "lr": DEFAULT_LR, "optimizer": "AdamW", "why": why}
