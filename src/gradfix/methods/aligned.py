"""Transport through an alignment of the two bases: TransFusion (permutations), Theseus (Procrustes).

Both carry ``τ_A`` into the target's coordinates, which the usual masks (GradFix's agreement with
the target's votes, or none) then act on. The alignment needs the two base models in memory;
Theseus also accepts a target of another width.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

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


def float_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The floating-point tensors of a checkpoint, in memory."""
    return {n: t for n, t in load_state_dict(path).items() if t.is_floating_point()}


class AlignedMethod(Method):
    """A method that carries ``τ_A`` into B's coordinates from both bases' weights, in memory."""

    aligns = True

    def align(
        self, tau_a: TaskVector, source_base: str | Path, target_base: str | Path, seed: int = 0
    ) -> TaskVector:
        """``τ_A`` in B's coordinates, from the floating-point weights of both bases."""
        source, target = float_state_dict(source_base), float_state_dict(target_base)
        heads = (num_heads_of(source_base), num_heads_of(target_base))
        return self.carry(tau_a, source, target, heads, seed)

    def carry(
        self,
        tau_a: TaskVector,
        source: dict[str, Tensor],
        target: dict[str, Tensor],
        heads: tuple[int | None, int | None],
        seed: int,
    ) -> TaskVector:
        """The alignment itself: ``heads`` are A's and B's attention heads (``None``: unknown)."""
        raise NotImplementedError


@register_method
class TransFusion(AlignedMethod):
    """Permute ``τ_A`` onto B by weight matching (data-free re-basin), then mask it if asked."""

    name = "transfusion"
    summary = "permute τ_A onto B by weight matching (data-free re-basin), then mask if --mask is given"

    def carry(
        self,
        tau_a: TaskVector,
        source: dict[str, Tensor],
        target: dict[str, Tensor],
        heads: tuple[int | None, int | None],
        seed: int,
    ) -> TaskVector:
        """``τ_A`` permuted into B's coordinates."""
        from gradfix.methods.transfusion import transfusion_task_vector

        return transfusion_task_vector(tau_a, source, target, num_heads=heads[0], seed=seed)


@register_method
class Theseus(AlignedMethod):
    """Map ``τ_A`` onto B by orthogonal Procrustes of the weights (data-free; widths may differ)."""

    name = "theseus"
    summary = "map τ_A onto B by orthogonal Procrustes of the weights (data-free; widths may differ)"

    def carry(
        self,
        tau_a: TaskVector,
        source: dict[str, Tensor],
        target: dict[str, Tensor],
        heads: tuple[int | None, int | None],
        seed: int,
    ) -> TaskVector:
        """``τ_A`` mapped into B's coordinates (B may be narrower or wider)."""
        from gradfix.methods.theseus import theseus_data_free_task_vector

        return theseus_data_free_task_vector(
            tau_a, source, target, num_heads=heads[0], target_num_heads=heads[1]
        )
