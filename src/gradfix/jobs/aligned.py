"""Transport through an alignment of the two bases: TransFusion (permutations) or Theseus (Procrustes).

Both produce ``τ_A`` expressed in the target's coordinates, which the usual masks (GradFix's
agreement with the target's votes, or none) then act on. The alignment needs the two base models
in memory; Theseus also accepts a target of another width.
"""

from __future__ import annotations

import json
from pathlib import Path

from gradfix.errors import ConfigError
from gradfix.io import load_state_dict
from gradfix.task_vector import TaskVector

METHODS = {
    "adaptive": "vote-margin gate, threshold t and α chosen on validation or on folds of the shots",
    "gradfix": "the published GradFix: mask τ_A with the target's sign votes (agreement), fixed α",
    "naive": "θ_B + α τ_A, no mask",
    "transfusion": "permute τ_A onto B by weight matching (data-free re-basin), then mask if --mask is given",
    "theseus": "map τ_A onto B by orthogonal Procrustes of the weights (data-free; widths may differ)",
}
"""Transport methods of ``gradfix transport --method``."""


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


def aligned_task_vector(
    method: str, tau_a: TaskVector, source_base: str | Path, target_base: str | Path, seed: int = 0
) -> TaskVector:
    """``τ_A`` carried into the target's coordinates by ``method`` (``transfusion`` or ``theseus``)."""
    source_sd = {n: t for n, t in load_state_dict(source_base).items() if t.is_floating_point()}
    target_sd = {n: t for n, t in load_state_dict(target_base).items() if t.is_floating_point()}
    heads = num_heads_of(source_base)
    if method == "transfusion":
        from gradfix.methods.transfusion import transfusion_task_vector

        return transfusion_task_vector(tau_a, source_sd, target_sd, num_heads=heads, seed=seed)
    if method == "theseus":
        from gradfix.methods.theseus import theseus_data_free_task_vector

        return theseus_data_free_task_vector(
            tau_a, source_sd, target_sd, num_heads=heads, target_num_heads=num_heads_of(target_base)
        )
    raise ConfigError(f"unknown alignment method {method!r}; choose transfusion or theseus")
