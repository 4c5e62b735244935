"""The transport-method registry: one :class:`Method` object per method, registered by name.

A method says what it is (name, one-line summary), which masks it allows and which it uses by
default, whether it can choose α (``alpha="auto"``) and how it carries ``τ_A`` into the target's
coordinates (``align``, for re-basin methods). :func:`resolve_method` fills in the settings that
depend on the method, the same way for the Python API and the command line, whose ``--method``
choices and help come from :data:`METHODS`. Adding a method is one new file in this folder with a
:class:`Method` subclass decorated with :func:`register_method`, plus its test.
"""

from __future__ import annotations

import math
from abc import ABC
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Final, TypeVar

from gradfix.errors import ConfigError
from gradfix.ops.masks import MASKS
from gradfix.registry import Registry
from gradfix.settings import DEFAULT_ALPHA, DEFAULT_METHOD, DEFAULT_THRESHOLD, Alpha, MaskSettings
from gradfix.task_vector import TaskVector

AUTO: Final = "auto"
"""The ``alpha`` setting that chooses α."""


def is_auto(alpha: Any) -> bool:
    """Whether ``alpha`` asks for α to be chosen (``"auto"``, any case)."""
    return isinstance(alpha, str) and alpha.strip().lower() == AUTO


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


class Method(ABC):
    """A transport method: ``θ_B + α · mask(align(τ_A))``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    masks: ClassVar[tuple[str, ...]] = tuple(MASKS)
    """The masks the method allows."""
    default_mask: ClassVar[str] = "none"
    default_alpha: ClassVar[float | str] = DEFAULT_ALPHA
    can_choose: ClassVar[bool] = False
    """Whether ``alpha="auto"`` is open to it."""
    chooses_threshold: ClassVar[bool] = False
    """Whether it always chooses the gate threshold ``t`` (from a grid); the others choosing α
    keep ``t = 0``, GradFix's agreement mask."""
    aligns: ClassVar[bool] = False
    """Whether ``τ_A`` is first carried into the target's coordinates (:meth:`align`)."""

    def resolve(self, masking: MaskSettings) -> MaskSettings:
        """``masking`` with the method's mask and α filled in; a ConfigError for what it refuses."""
        mask = masking.mask if masking.mask is not None else self.default_mask
        if mask not in self.masks:
            raise ConfigError(
                f"--method {self.name} does not take --mask {mask}; it takes {', '.join(self.masks)}"
            )
        given = masking.alpha if masking.alpha is not None else self.default_alpha
        alpha: Alpha
        if is_auto(given):
            if not self.can_choose:
                raise ConfigError(
                    f"--alpha auto chooses α for --method adaptive or gradfix; give --alpha a number for "
                    f"--method {self.name}"
                )
            alpha = AUTO
        else:
            alpha = fixed_alpha(given)
        threshold = masking.threshold if masking.threshold is not None else DEFAULT_THRESHOLD
        return replace(masking, mask=mask, alpha=alpha, threshold=threshold)

    def align(
        self, tau_a: TaskVector, source_base: str | Path, target_base: str | Path, seed: int = 0
    ) -> TaskVector:
        """``τ_A`` in the target's coordinates (the identity unless the method aligns)."""
        return tau_a


METHODS: Registry[Method] = Registry("method")
"""Every registered transport method, by name, in registration order."""

T = TypeVar("T", bound=type[Method])


def register_method(cls: T) -> T:
    """Class decorator: register one instance of a :class:`Method` subclass under its ``name``."""
    METHODS.register(cls.name, cls())
    return cls


def get_method(name: str) -> Method:
    """The registered method ``name``; a :class:`ConfigError` listing the choices otherwise."""
    return METHODS.lookup(name)


def resolve_method(name: str | None, masking: MaskSettings) -> tuple[Method, MaskSettings]:
    """The method and its resolved settings, as the API and the command line both take them.

    No method: :data:`~gradfix.settings.DEFAULT_METHOD` (``adaptive``), or ``gradfix`` when a
    mask is given. Then the method fills in its mask and α (:meth:`Method.resolve`).
    """
    if name is None:
        name = "gradfix" if masking.mask is not None else DEFAULT_METHOD
    method = get_method(name)
    return method, method.resolve(masking)
