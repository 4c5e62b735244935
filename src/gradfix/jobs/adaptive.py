"""Choosing the gate threshold ``t`` and α of a transport (``--method adaptive``, ``--alpha auto``).

``method="adaptive"`` transports ``θ_B + α · (m_t ⊙ τ_A)`` with ``m_t`` the vote-margin gate
(:func:`gradfix.ops.masks.vote_margin_gate`: ``t = 0`` is GradFix's agreement mask, ``t > 1``
naive addition) and ``(t, α)`` chosen from a grid by :mod:`gradfix.methods.autotune`:

- with a **validation file**: the candidate with the best accuracy of ``θ_B + α · (m_t ⊙ τ_A)``
  on it (:func:`~gradfix.methods.autotune.choose_on_validation`; B's loaded model, weights swapped in
  memory), ``m_t`` from the votes on every shot;
- otherwise by **2-fold cross-validation over the shots**
  (:func:`~gradfix.methods.autotune.choose_on_shots`): votes on one fold, the loss on the other, and
  the no-harm rule (B unchanged unless a candidate lowers B's held-out loss on every fold and by
  more than one standard error; then the largest such lower bound), never a candidate less
  accurate on the held-out shots than B itself (recipes with class logits); the final votes then
  use every shot.

``alpha="auto"`` with ``method="gradfix"`` chooses only α (the threshold grid is ``[0]``: the
agreement mask); a fixed α with ``method="adaptive"`` chooses only ``t``. Ties go to the earlier
candidate. The choice needs ``τ_A`` in memory (B's model is in memory anyway, for the votes);
tensors of ``τ_A`` that are not parameters of B's loaded model take no part in the choice.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from gradfix.data import UNLABELLED, Example, check_known_labels
from gradfix.errors import ConfigError, DataError, GradfixError
from gradfix.jobs.common import Shots, rename_votes
from gradfix.jobs.inputs import target_label_set
from gradfix.methods.adaptive import ChoicePlan, choice_grid
from gradfix.methods.autotune import Choice, FoldSigns, choose_on_shots, choose_on_validation, swapped_weights
from gradfix.methods.registry import Method
from gradfix.recipes import get_recipe
from gradfix.recipes.base import place_batch
from gradfix.settings import MaskSettings, VoteSettings
from gradfix.votes import SignVotes

FOLDS = 2
"""Folds of the cross-validation over the shots."""


def plan_choice(
    method: Method, masking: MaskSettings, votes: VoteSettings, target: str | Path
) -> ChoicePlan | None:
    """The choice a resolved transport makes, checked before any long work; ``None`` when none.

    The grids come from :func:`gradfix.methods.adaptive.choice_grid`; a validation file is read
    and checked here (present, well formed, labels the target knows).
    """
    grid = choice_grid(method, masking)
    if grid is None or masking.validation is None:
        return grid
    if not get_recipe(votes.recipe).scores_accuracy:
        raise ConfigError(
            f"--validation scores candidates by accuracy, which the {votes.recipe} recipe has not; "
            "leave it out to choose on the shots' loss"
        )
    examples = load_validation(masking.validation, votes.recipe, target)
    return replace(grid, validation=str(masking.validation), examples=examples)


def load_validation(path: str | Path, recipe: str, target: str | Path) -> list[Example]:
    """Read the validation file (same formats as ``--data``); errors name ``--validation``."""
    try:
        examples = get_recipe(recipe).read_examples(path)
        known = target_label_set(recipe, target)
        if known is not None:
            check_known_labels(examples, known[0], path, known[1])
    except DataError as exc:
        raise DataError(f"--validation: {exc}") from None
    return examples


def check_evidence(plan: ChoicePlan, shots: Shots | None) -> None:
    """Refuse, before any long work, a choice that has nothing to choose on.

    Without a validation file the shots are split into :data:`FOLDS` folds that each hold every
    class, so every class needs at least 2 shots (data without classes: 2 shots in all). With one,
    its labels must be among the labels the target's recipe is built for (those of ``--data``).
    """
    if plan.examples is not None:
        if shots is not None:
            try:
                check_known_labels(
                    plan.examples, shots.labels, plan.validation, f"the labels of {shots.data}"
                )
            except DataError as exc:
                raise DataError(f"--validation: {exc}") from None
        return
    if shots is None:
        raise ConfigError(
            "choosing t and α needs evidence: the shots of --data (cross-validated over 2 folds) or a "
            "--validation file; or give --method gradfix --alpha 1.0 for the published algorithm"
        )
    counts = Counter(ex.label for ex in shots.drawn)
    few = sorted((n, label) for label, n in counts.items() if n < FOLDS)
    if few or len(shots.drawn) < FOLDS:
        n, label = few[0] if few else (len(shots.drawn), "")
        unlabelled = set(counts) <= {UNLABELLED}
        which = f"class {label!r} has {n}" if few and not unlabelled else f"there are {n}"
        per = "" if unlabelled else " per class"
        raise ConfigError(
            f"choosing t and α without --validation splits the shots into {FOLDS} folds and needs at "
            f"least {FOLDS} shots{per}, but {which}; give --shots {FOLDS} or more, or a "
            "--validation file"
        )


def correct_predictions(recipe: Any) -> Any:
    """``(model, batch) -> 1/0 per sample`` for a recipe with class logits (``None`` otherwise)."""
    if not (hasattr(recipe, "logits") and getattr(recipe, "scores_accuracy", True)):
        return None

    def correct(model: nn.Module, batch: Any) -> Tensor:
        return (recipe.logits(model, batch).argmax(dim=-1) == batch["labels"]).double()

    return correct


def choose(
    plan: ChoicePlan,
    tau: Mapping[str, Tensor],
    votes: SignVotes | None,
    model: nn.Module,
    recipe: Any,
    mapping: Mapping[str, str],
    shots: Sequence[Example] | None,
    settings: VoteSettings,
    unvoted: str = "error",
    fold_signs: FoldSigns | None = None,
) -> Choice:
    """Choose ``(t, α)`` for ``τ_A`` (checkpoint names) on the target's loaded ``model``.

    ``mapping`` is ``{model parameter name: checkpoint name}``; ``votes`` (checkpoint names) are
    the final votes, used with a validation file; without one the shots are cross-validated
    (their votes are taken again per fold, on the model's current weights ``θ_B``). The model's
    weights are unchanged afterwards. ``fold_signs`` replaces each fold's vote (:mod:`gradfix.jobs.signs`).
    Raises when every candidate's score is non-finite.
    """
    inverse = {c: m for m, c in mapping.items()}
    params = {n for n, _ in model.named_parameters()}
    local = {inverse[n]: t for n, t in tau.items() if n in inverse and inverse[n] in params}
    if not local:
        raise GradfixError("no tensor of the task vector is a parameter of the target's model")
    if plan.examples is not None:
        local_votes = rename_votes(votes, inverse) if votes is not None else None
        examples = plan.examples

        def score(update: Mapping[str, Tensor], alpha: float) -> float:
            with swapped_weights(model, update, alpha):
                return recipe.accuracy(model, examples, batch_size=settings.batch_size)

        choice = choose_on_validation(
            local, local_votes, score, plan.thresholds, plan.alphas, unvoted, plan.grown
        )
    else:
        assert shots is not None
        # a tensor that one fold's shots leave without gradient is a gap of that fold, not of the
        # votes on every shot (checked before): drop it there rather than stop
        fold_unvoted = "drop" if unvoted == "error" else unvoted
        choice = choose_on_shots(
            model,
            local,
            list(shots),
            [ex.label for ex in shots],
            lambda examples: place_batch(recipe.collate(examples), model),
            recipe.loss,
            plan.thresholds,
            plan.alphas,
            folds=FOLDS,
            seed=settings.seed,
            unvoted=fold_unvoted,
            engine=settings.engine,
            correct=correct_predictions(recipe),
            grown=plan.grown,
            fold_signs=fold_signs,
        )
    if not math.isfinite(choice.score):
        raise GradfixError(
            "every candidate (t, α) gave a non-finite loss on the shots; give smaller --alphas"
        )
    return choice


def choice_record(choice: Choice) -> dict[str, Any]:
    """``Choice.to_dict()`` with non-finite scores written as ``null`` (valid JSON)."""
    record = choice.to_dict()
    record["scores"] = {k: (v if math.isfinite(v) else None) for k, v in record["scores"].items()}
    return record


__all__ = [
    "FOLDS",
    "check_evidence",
    "choice_record",
    "choose",
    "load_validation",
    "plan_choice",
]
