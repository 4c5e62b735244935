"""Choosing the gate threshold ``t`` and α of a transport (``--method adaptive``, ``--alpha auto``).

``method="adaptive"`` transports ``θ_B + α · (m_t ⊙ τ_A)`` with ``m_t`` the vote-margin gate
(:func:`gradfix.ops.masks.vote_margin_gate`: ``t = 0`` is GradFix's agreement mask, ``t > 1``
naive addition) and ``(t, α)`` chosen from a grid by :mod:`gradfix.methods.autotune`:

- with a **validation file**: the candidate with the best accuracy of ``θ_B + α · (m_t ⊙ τ_A)``
  on it (:func:`~gradfix.methods.autotune.choose_on_validation`; B's loaded model, weights swapped in
  memory), ``m_t`` from the votes on every shot;
- otherwise by **2-fold cross-validation over the shots**
  (:func:`~gradfix.methods.autotune.choose_on_shots`): votes on one fold, the loss on the other, and
  the one-standard-error rule (the smallest update within one standard error of the lowest
  held-out loss), never a candidate less accurate on the held-out shots than B itself (recipes
  with class logits); the final votes then use every shot.

``alpha="auto"`` with ``method="gradfix"`` chooses only α (the threshold grid is ``[0]``: the
agreement mask); a fixed α with ``method="adaptive"`` chooses only ``t``. Ties go to the earlier
candidate. The choice needs ``τ_A`` in memory (B's model is in memory anyway, for the votes);
tensors of ``τ_A`` that are not parameters of B's loaded model take no part in the choice.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradfix.data import Example, check_known_labels, load_examples
from gradfix.errors import ConfigError, DataError, GradfixError
from gradfix.jobs.common import MaskSettings, Shots, VoteSettings, rename_votes
from gradfix.jobs.inputs import target_label_set
from gradfix.methods.autotune import (
    DEFAULT_ALPHAS,
    DEFAULT_THRESHOLDS,
    NAIVE,
    Choice,
    choose_on_shots,
    choose_on_validation,
)
from gradfix.task_vector import apply_tensor
from gradfix.votes import SignVotes

AUTO = "auto"
"""The ``alpha`` setting that chooses α."""

FOLDS = 2
"""Folds of the cross-validation over the shots."""

CHOOSING_METHODS = ("adaptive", "gradfix")


@dataclass(frozen=True)
class ChoicePlan:
    """What a choosing transport tries: the candidate grids and the evidence (validation or shots)."""

    thresholds: list[float]
    alphas: list[float]
    validation: str | None = None
    examples: list[Example] | None = None

    @property
    def source(self) -> str:
        """``"validation"`` or ``"shots"``."""
        return "validation" if self.validation is not None else "shots"


def grid_value(value: Any, what: str) -> float:
    """One candidate of a grid as a float (``"naive"`` is a threshold above 1); raises ConfigError."""
    if isinstance(value, str) and value.strip().lower() == "naive" and what == "threshold":
        return NAIVE
    if isinstance(value, bool):
        raise ConfigError(f"bad {what} {value!r}: give a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        extra = " or 'naive'" if what == "threshold" else ""
        raise ConfigError(f"bad {what} {value!r}: give a number{extra}") from None
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"bad {what} {value!r}: {what}s must be finite and ≥ 0")
    return number


def fixed_alpha(value: Any) -> float:
    """A fixed α as a float; raises ConfigError for anything else (``"auto"`` included)."""
    if isinstance(value, bool):
        raise ConfigError(f"bad alpha {value!r}: give a number or 'auto'")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"bad alpha {value!r}: give a number or 'auto'") from None
    if not math.isfinite(number):
        raise ConfigError(f"bad alpha {value!r}: α must be finite")
    return number


def is_auto(alpha: Any) -> bool:
    """Whether ``alpha`` asks for α to be chosen (``"auto"``, any case)."""
    return isinstance(alpha, str) and alpha.strip().lower() == AUTO


def plan_choice(
    method: str, masking: MaskSettings, votes: VoteSettings, target: str | Path
) -> ChoicePlan | None:
    """Check the choosing settings before any long work; ``None`` when nothing is chosen.

    Refuses ``alpha="auto"`` with a method that cannot choose, grids or a validation file given
    to a transport that chooses nothing, a bad grid value, a mask other than the gate for
    ``adaptive`` (or than agreement for ``gradfix`` with ``alpha="auto"``), and reads and checks
    the validation file (present, well formed, labels the target knows).
    """
    auto = is_auto(masking.alpha)
    choosing = method == "adaptive" or auto
    if not choosing:
        fixed_alpha(masking.alpha)
        for option, value in (
            ("--thresholds", masking.thresholds),
            ("--alphas", masking.alphas),
            ("--validation", masking.validation),
        ):
            if value is not None:
                raise ConfigError(
                    f"{option} is for choosing t and α: use it with --method adaptive or --alpha auto"
                )
        return None
    if method not in CHOOSING_METHODS:
        raise ConfigError(
            f"--alpha auto chooses α for --method adaptive or gradfix; give --alpha a number for "
            f"--method {method}"
        )
    if method == "adaptive" and masking.mask not in ("gate", "agreement"):
        raise ConfigError(
            f"--method adaptive masks with the vote-margin gate (t chosen from --thresholds); "
            f"--mask {masking.mask} is for --method gradfix"
        )
    if method == "gradfix" and masking.mask != "agreement":
        raise ConfigError(
            f"--alpha auto with --method gradfix chooses α for the agreement mask, not --mask "
            f"{masking.mask}; give --alpha a number, or use --method adaptive"
        )
    if method == "gradfix" and masking.thresholds is not None:
        raise ConfigError(
            "--thresholds are the gate thresholds of --method adaptive; --method gradfix uses t = 0"
        )
    if not auto and masking.alphas is not None:
        raise ConfigError(f"--alphas is the α grid of --alpha auto, but --alpha is {masking.alpha}")
    if method == "adaptive":
        given = list(DEFAULT_THRESHOLDS) if masking.thresholds is None else list(masking.thresholds)
        thresholds = [grid_value(t, "threshold") for t in given]
    else:
        thresholds = [0.0]
    if auto:
        given = list(DEFAULT_ALPHAS) if masking.alphas is None else list(masking.alphas)
        alphas = [grid_value(a, "alpha") for a in given]
    else:
        alphas = [fixed_alpha(masking.alpha)]
    if not thresholds:
        raise ConfigError("--thresholds needs at least one value")
    if not alphas:
        raise ConfigError("--alphas needs at least one value")
    thresholds, alphas = list(dict.fromkeys(thresholds)), list(dict.fromkeys(alphas))
    if masking.validation is None:
        return ChoicePlan(thresholds, alphas)
    if votes.recipe == "causal-lm":
        raise ConfigError(
            "--validation scores candidates by accuracy, which the causal-lm recipe has not; leave it "
            "out to choose on the shots' loss"
        )
    examples = load_validation(masking.validation, votes.recipe, target)
    return ChoicePlan(thresholds, alphas, str(masking.validation), examples)


def load_validation(path: str | Path, recipe: str, target: str | Path) -> list[Example]:
    """Read the validation file (same formats as ``--data``); errors name ``--validation``."""
    try:
        examples = load_examples(path)
        known = target_label_set(recipe, target)
        if known is not None:
            check_known_labels(examples, known[0], path, known[1])
    except DataError as exc:
        raise DataError(f"--validation: {exc}") from None
    return examples


def check_evidence(plan: ChoicePlan, shots: Shots | None) -> None:
    """Refuse, before any long work, a choice that has nothing to choose on.

    Without a validation file the shots are split into :data:`FOLDS` folds that each hold every
    class, so every class needs at least 2 shots. With one, its labels must be among the labels
    the target's recipe is built for (those of ``--data``).
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
        which = f"class {label!r} has {n}" if few else f"there are {n}"
        raise ConfigError(
            f"choosing t and α without --validation splits the shots into {FOLDS} folds and needs at "
            f"least {FOLDS} shots per class, but {which}; give --shots {FOLDS} or more, or a "
            "--validation file"
        )


@contextmanager
def swapped_weights(model: nn.Module, update: Mapping[str, Tensor], alpha: float) -> Iterator[nn.Module]:
    """Inside the block the model's parameters named in ``update`` are ``θ + α · update``.

    ``θ`` are the weights on entry; they are put back on exit (also on an error). The sum is
    computed as the written model's (:func:`gradfix.task_vector.apply_tensor`).
    """
    params = dict(model.named_parameters())
    missing = [n for n in update if n not in params]
    if missing:
        raise ConfigError(f"the task vector names tensors the model lacks: {missing[:5]}")
    saved = {n: params[n].detach().clone() for n in update}
    try:
        with torch.no_grad():
            for name, tau in update.items():
                params[name].copy_(apply_tensor(saved[name], tau.to(saved[name].device), alpha))
        yield model
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def correct_predictions(recipe: Any) -> Any:
    """``(model, batch) -> 1/0 per sample`` for a recipe with class logits (``None`` otherwise)."""
    from gradfix.recipes.text import CausalLMRecipe

    if isinstance(recipe, CausalLMRecipe) or not hasattr(recipe, "logits"):
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
) -> Choice:
    """Choose ``(t, α)`` for ``τ_A`` (checkpoint names) on the target's loaded ``model``.

    ``mapping`` is ``{model parameter name: checkpoint name}``; ``votes`` (checkpoint names) are
    the final votes, used with a validation file; without one the shots are cross-validated
    (their votes are taken again per fold, on the model's current weights ``θ_B``). The model's
    weights are unchanged afterwards. Raises when every candidate's score is non-finite.
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

        choice = choose_on_validation(local, local_votes, score, plan.thresholds, plan.alphas, unvoted)
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
            recipe.collate,
            recipe.loss,
            plan.thresholds,
            plan.alphas,
            folds=FOLDS,
            seed=settings.seed,
            unvoted=fold_unvoted,
            engine=settings.engine,
            correct=correct_predictions(recipe),
        )
    if not math.isfinite(choice.score):
        raise GradfixError(
            "every candidate (t, α) gave a non-finite loss on the shots; give smaller --alphas"
        )
    return choice


def output_mask(threshold: float) -> str:
    """The streamed mask that writes ``m_t ⊙ τ_A`` as :func:`gradfix.methods.autotune.gated` computes it.

    ``t = 0``: the agreement mask; ``t > 0``: the gate (above 1 it keeps every voted coordinate).
    Tensors without votes follow the unvoted policy, as they did in the choice.
    """
    return "agreement" if threshold == 0 else "gate"


def choice_record(choice: Choice) -> dict[str, Any]:
    """``Choice.to_dict()`` with non-finite scores written as ``null`` (valid JSON)."""
    record = choice.to_dict()
    record["scores"] = {k: (v if math.isfinite(v) else None) for k, v in record["scores"].items()}
    return record


__all__ = [
    "AUTO",
    "CHOOSING_METHODS",
    "FOLDS",
    "ChoicePlan",
    "check_evidence",
    "choice_record",
    "choose",
    "fixed_alpha",
    "grid_value",
    "is_auto",
    "load_validation",
    "output_mask",
    "plan_choice",
    "swapped_weights",
]
