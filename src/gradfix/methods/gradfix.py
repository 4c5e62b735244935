"""The published GradFix: mask ``τ_A`` with the target's sign votes (agreement mask), fixed α."""

from __future__ import annotations

from gradfix.methods.registry import Method, register_method


@register_method
class GradFix(Method):
    """``θ_B + α · (m ⊙ τ_A)`` with ``m`` the agreement mask (Eq. 4) or any other registered mask.

    ``alpha="auto"`` chooses α for the agreement mask (the gate threshold stays 0).
    """

    name = "gradfix"
    summary = "the published GradFix: mask τ_A with the target's sign votes (agreement), fixed α"
    default_mask = "agreement"
    can_choose = True
