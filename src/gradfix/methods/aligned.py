"""Transport through an alignment of the two bases: TransFusion (permutations), Theseus (Procrustes).

Both carry ``τ_A`` into the target's coordinates, which the usual masks (GradFix's agreement with
the target's votes, or none) then act on. The alignment needs the two base models in memory;
Theseus also accepts a target of another width.
"""

from __future__ import annotations

import json
from pathlib import Path

from gradfix.io import load_state_dict
from gradfix.methods.registry import Method, register_method
from gradfix.task_vector import TaskVector


def num_heads_of(folder: str | Path) -> int | None:
    """``num_attention_heads`` from a model folder's ``config.json`` (``None`` when absent)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("num_attention_heads")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) else None


def float_state_dict(path: str | Path) -> dict:
    """The floating-point tensors of a checkpoint, in memory."""
    return {n: t for n, t in load_state_dict(path).items() if t.is_floating_point()}


@register_method
class TransFusion(Method):
    """Permute ``τ_A`` onto B by weight matching (data-free re-basin), then mask it if asked."""

    name = "transfusion"
    summary = "permute τ_A onto B by weight matching (data-free re-basin), then mask if --mask is given"
    aligns = True

    def align(
        self, tau_a: TaskVector, source_base: str | Path, target_base: str | Path, seed: int = 0
    ) -> TaskVector:
        """``τ_A`` permuted into B's coordinates."""
        from gradfix.methods.transfusion import transfusion_task_vector

        source, target = float_state_dict(source_base), float_state_dict(target_base)
        return transfusion_task_vector(tau_a, source, target, num_heads=num_heads_of(source_base), seed=seed)


@register_method
class Theseus(Method):
    """Map ``τ_A`` onto B by orthogonal Procrustes of the weights (data-free; widths may differ)."""

    name = "theseus"
    summary = "map τ_A onto B by orthogonal Procrustes of the weights (data-free; widths may differ)"
    aligns = True

    def align(
        self, tau_a: TaskVector, source_base: str | Path, target_base: str | Path, seed: int = 0
    ) -> TaskVector:
        """``τ_A`` mapped into B's coordinates (B may be narrower or wider)."""
        from gradfix.methods.theseus import theseus_data_free_task_vector

        source, target = float_state_dict(source_base), float_state_dict(target_base)
        return theseus_data_free_task_vector(
            tau_a,
            source,
            target,
            num_heads=num_heads_of(source_base),
            target_num_heads=num_heads_of(target_base),
        )
