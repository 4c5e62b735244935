"""The adaptive transport: the vote-margin gate with its threshold ``t`` and α chosen.

``θ_B + α · (m_t ⊙ τ_A)`` with ``m_t`` the vote-margin gate (``t = 0`` is GradFix's agreement
mask, ``t > 1`` naive addition); ``(t, α)`` is chosen from a grid by :mod:`gradfix.methods.autotune`
on a validation file, or by cross-validation over the shots. :func:`choice_grid` turns the
settings into the grid, for this method and for ``gradfix`` with ``alpha="auto"`` (α alone);
:func:`~gradfix.methods.autotune.gate_mask` names the mask that writes the chosen ``t``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gradfix.errors import ConfigError
from gradfix.methods.autotune import DEFAULT_ALPHAS, DEFAULT_THRESHOLDS, GROWN_ALPHAS, NAIVE, gate_mask
from gradfix.methods.registry import AUTO, Method, fixed_alpha, is_auto, register_method
from gradfix.settings import MaskSettings


@register_method
class Adaptive(Method):
    """The gate with ``t`` (and, with ``alpha="auto"``, α) chosen on validation or on the shots."""

    name = "adaptive"
    summary = "vote-margin gate, threshold t and α chosen on validation or on folds of the shots"
    masks = ("gate",)
    default_mask = "gate"
    default_alpha = AUTO
    can_choose = True
    chooses_threshold = True

    def resolve(self, masking: MaskSettings) -> MaskSettings:
        """The gate, α ``auto`` by default; a fixed ``threshold`` is refused (it is chosen)."""
        if masking.mask not in (None, "gate"):
            raise ConfigError(
                f"--method adaptive masks with the vote-margin gate; --mask {masking.mask} is for "
                "--method gradfix"
            )
        if masking.threshold is not None:
            raise ConfigError(
                "--method adaptive chooses the gate threshold from --thresholds (give one value to fix "
                "it); --threshold is for --method gradfix --mask gate"
            )
        return super().resolve(masking)


@dataclass(frozen=True)
class ChoicePlan:
    """What a choosing transport tries: the candidate grids (and, set by the job, a validation file)."""

    thresholds: list[float]
    alphas: list[float]
    grown: tuple[float, ...] = ()
    """Larger α tried where the grid's largest wins (the default grid's :data:`GROWN_ALPHAS`; none
    for a grid the user gave)."""
    validation: str | None = None
    examples: list[Any] | None = None

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


def _refuse_grids(masking: MaskSettings) -> None:
    for option, value in (
        ("--thresholds", masking.thresholds),
        ("--alphas", masking.alphas),
        ("--validation", masking.validation),
    ):
        if value is not None:
            raise ConfigError(
                f"{option} is for choosing t and α: use it with --method adaptive or --alpha auto"
            )


def choice_grid(method: Method, masking: MaskSettings) -> ChoicePlan | None:
    """The candidate grids of a resolved transport; ``None`` when it chooses nothing.

    Refuses grids or a validation file given to a transport that chooses nothing, a mask other
    than agreement for ``gradfix`` with ``alpha="auto"``, thresholds for ``gradfix`` (it uses
    ``t = 0``), an α grid with a fixed α, and bad grid values.
    """
    auto = is_auto(masking.alpha)
    if not (method.chooses_threshold or auto):
        _refuse_grids(masking)
        return None
    if not method.chooses_threshold and masking.mask != "agreement":
        raise ConfigError(
            f"--alpha auto with --method {method.name} chooses α for the agreement mask, not --mask "
            f"{masking.mask}; give --alpha a number, or use --method adaptive"
        )
    if not method.chooses_threshold and masking.thresholds is not None:
        raise ConfigError(
            f"--thresholds are the gate thresholds of --method adaptive; --method {method.name} uses t = 0"
        )
    if not auto and masking.alphas is not None:
        raise ConfigError(f"--alphas is the α grid of --alpha auto, but --alpha is {masking.alpha}")
    if method.chooses_threshold:
        given: list[Any] = (
            list(DEFAULT_THRESHOLDS) if masking.thresholds is None else list(masking.thresholds)
        )
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
    grown = GROWN_ALPHAS if auto and masking.alphas is None else ()
    return ChoicePlan(list(dict.fromkeys(thresholds)), list(dict.fromkeys(alphas)), grown)


__all__ = ["Adaptive", "ChoicePlan", "choice_grid", "gate_mask", "grid_value"]
