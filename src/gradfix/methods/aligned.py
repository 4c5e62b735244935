"""Transport through an alignment of the two bases: TransFusion (permutations), Theseus (Procrustes).

Both carry ``τ_A`` into the target's coordinates, which the usual masks (GradFix's agreement with
the target's votes, or none) then act on. The alignment needs the two base models in memory;
Theseus also accepts a target of another width.

Theseus has two sources for its maps: the bases' weights (data-free, :meth:`AlignedMethod.align`)
and, given examples, the activations of A and B on them
(:meth:`Theseus.from_activations`): one orthogonal Procrustes map per space from the
cross-covariance ``Σ X_Aᵀ X_B`` of the two models on the same tokens, with the library's defaults,
no mean-centring and no whitening (``p = 0``). Those are the settings that ``experiments/crosswidth.py``
kept after measuring centring and ``p = 0.25, 0.5`` (each with and without centring, seeds 0-2):
none of them did better.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from gradfix.errors import ConfigError
from gradfix.io import load_state_dict
from gradfix.methods.activations import CrossStats, ForwardFn, TokenMask
from gradfix.methods.registry import Method, register_method
from gradfix.task_vector import TaskVector

if TYPE_CHECKING:  # the alignments import scipy: loaded when a method runs
    from gradfix.methods.transfusion import PermutationSpec

THESEUS_CENTER: bool = False
"""Theseus from activations: whether each site's activations are mean-centred (the library's default)."""
THESEUS_WHITEN: float = 0.0
"""Theseus: the partial-whitening power ``p`` (``0``: the plain cross-covariance, the default)."""


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


def module_spec(model: nn.Module, label: str) -> PermutationSpec:
    """The spaces of a loaded model (:func:`~gradfix.methods.transfusion.spec_for_module`); a
    :class:`ConfigError` that names the model (``label``) and the tensors that do not fit otherwise."""
    from gradfix.methods.transfusion import spec_for_module

    try:
        return spec_for_module(model)
    except ConfigError as exc:
        raise ConfigError(f"{label}: {exc}") from None


def underdetermined_spaces(stats: Mapping[str, CrossStats], rtol: float = 1e-8) -> dict[str, list[int]]:
    """``{space: [rank, width]}`` for every space whose ``C_s`` has rank below ``min(d_A, d_B)``.

    Procrustes completes the directions the examples never reached arbitrarily, so these spaces'
    maps are only partly fixed by the data (more examples, or longer ones, fix them).
    """
    out = {}
    for space, s in stats.items():
        width = min(s.widths)
        rank = int(torch.linalg.matrix_rank(s.cross.double(), rtol=rtol))
        if rank < width:
            out[space] = [rank, width]
    return out


class AlignedMethod(Method):
    """A method that carries ``τ_A`` into B's coordinates from both bases' weights, in memory."""

    aligns = True
    uses_activations: ClassVar[bool] = False
    """Whether the method maps from A's and B's activations when the transport has examples."""

    def weights_record(self) -> dict[str, Any] | None:
        """What ``gradfix.json`` records of an alignment from the weights (``None``: nothing)."""
        return None

    def from_activations(
        self,
        tau_a: Mapping[str, Tensor],
        models: tuple[nn.Module, nn.Module],
        batches: Iterable[Any],
        forwards: tuple[ForwardFn, ForwardFn],
        token_mask: TokenMask | None,
    ) -> tuple[TaskVector, dict[str, Any]]:
        """``τ_A`` (keyed by A's parameter names) in B's coordinates from activations, and its record."""
        raise ConfigError(f"--method {self.name} does not map from activations")

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
    """Map ``τ_A`` onto B by orthogonal Procrustes, from activations on examples or from the weights."""

    name = "theseus"
    summary = (
        "map τ_A onto B by orthogonal Procrustes (from A's and B's activations on the shots with "
        "--data, else data-free from the weights; widths may differ)"
    )
    uses_activations = True

    def weights_record(self) -> dict[str, Any]:
        """``{"from": "weights", "examples": 0, ...}``: the data-free maps' settings."""
        return {"from": "weights", "examples": 0, "whiten": THESEUS_WHITEN}

    def from_activations(
        self,
        tau_a: Mapping[str, Tensor],
        models: tuple[nn.Module, nn.Module],
        batches: Iterable[Any],
        forwards: tuple[ForwardFn, ForwardFn],
        token_mask: TokenMask | None,
    ) -> tuple[TaskVector, dict[str, Any]]:
        """``τ_A`` mapped by one Procrustes map per space from ``C_s = Σ X_Aᵀ X_B`` on ``batches``.

        ``tau_a`` is keyed by A's parameter names, and so is the result (B has the same names, its
        own widths). A and B must have the same spaces (same depth and layout); the spec of each is
        built from the loaded model (a :class:`ConfigError` names the tensors it cannot place).
        Both models see every batch (``forwards``: A's and B's forward function, e.g. each
        recipe's loss on its own tokenisation); ``token_mask`` drops padding. No centring, no
        whitening (:data:`THESEUS_CENTER`, :data:`THESEUS_WHITEN`). The record states the settings,
        the number of spaces and the spaces the examples leave underdetermined
        (:func:`underdetermined_spaces`).
        """
        from gradfix.methods.theseus import space_statistics, theseus_task_vector

        model_a, model_b = models
        spec, spec_b = module_spec(model_a, "source base"), module_spec(model_b, "target base")
        if list(spec.groups) != list(spec_b.groups):
            only = sorted(set(spec.groups) ^ set(spec_b.groups))
            raise ConfigError(
                f"source and target base have different layouts (spaces {', '.join(only[:6])} are in "
                "only one); Theseus maps between models of one depth and layout"
            )
        stats = space_statistics(
            model_a, model_b, batches, spec, forwards[0], forward_fn_b=forwards[1],
            token_mask=token_mask, center=THESEUS_CENTER,
        )  # fmt: skip
        heads = getattr(getattr(model_b, "config", None), "num_attention_heads", None)
        tau = theseus_task_vector(tau_a, stats, spec, whiten=THESEUS_WHITEN, target_num_heads=heads)
        record = {
            "from": "activations",
            "center": THESEUS_CENTER,
            "whiten": THESEUS_WHITEN,
            "spaces": len(stats),
            "underdetermined": underdetermined_spaces(stats),
        }
        return tau, record

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
