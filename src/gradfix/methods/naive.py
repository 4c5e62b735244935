"""Naive transport: ``θ_B + α · τ_A``, no votes, no mask."""

from __future__ import annotations

from gradfix.methods.registry import Method, register_method


@register_method
class Naive(Method):
    """Task arithmetic onto the new base: every coordinate of ``τ_A`` is kept."""

    name = "naive"
    summary = "θ_B + α τ_A, no mask"
    masks = ("none",)
    default_mask = "none"
