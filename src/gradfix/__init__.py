"""gradfix: carry a fine-tune across base-model releases.

GradFix moves a task vector ``τ_A = θ_A^ft − θ_A`` onto a new base ``θ_B`` by keeping only the
coordinates whose sign agrees with the target's anti-gradient, estimated by a majority vote over
per-sample gradients on a few labelled examples: ``θ_B + α · (m ⊙ τ_A)``.

>>> from gradfix import TaskVector, estimate_signs, transport
>>> tau = TaskVector.from_checkpoints("A-base/", "A-finetuned/")          # doctest: +SKIP
>>> votes = estimate_signs(model_b, batches, loss_fn)                     # doctest: +SKIP
>>> new_sd = transport(model_b.state_dict(), tau, votes, alpha=1.0)       # doctest: +SKIP

The public API, by concept (each name lives in the submodule named beside it):

- task vectors: :class:`TaskVector`, :func:`random_task_vector` (:mod:`gradfix.task_vector`);
- votes: :class:`SignVotes`, :func:`estimate_signs` (:mod:`gradfix.votes`);
- masks and transport: :func:`mask_task_vector`, :func:`transport`, :func:`reference_signs`
  (:mod:`gradfix.masking`), :data:`MASKS`, :func:`register_mask` (:mod:`gradfix.ops.masks`);
- methods: :data:`METHODS`, :func:`register_method`, :func:`resolve_method` (:mod:`gradfix.methods`);
- merging: :func:`merge_task_vectors`, :func:`mask_then_merge`, :func:`merge_then_mask`,
  :func:`multi_source_merge` (:mod:`gradfix.merge`);
- the automatic choice: :func:`choose_on_validation`, :func:`choose_on_shots`, :func:`gated`
  (:mod:`gradfix.methods.autotune`);
- recipes: :func:`load_recipe`, :data:`RECIPES` (:mod:`gradfix.recipes`);
- the checkpoint jobs: :func:`transport_checkpoints`, :func:`merge_checkpoints`,
  :func:`evaluate_model`, :class:`VoteSettings`, :class:`MaskSettings` (:mod:`gradfix.jobs`,
  :mod:`gradfix.settings`);
- diagnostics: :func:`descent_report`, :func:`sign_agreement` (:mod:`gradfix.diagnostics`).

No name here is also the name of a submodule, so ``import gradfix.masking`` and
``gradfix.masking.mask_task_vector`` always mean the module. Recipes and jobs (which import
``transformers``) are imported on first use.
"""

from __future__ import annotations

import os

# PyTorch's OpenMP threads (libgomp) spin for a while each time they wait for work. On a machine
# busy with other jobs the spinning threads take the cores from the ones doing the work: a vote
# measured 7x slower with 2 threads than with 1 at a load of 6, and as fast as with 1 thread with
# passive waiting. libgomp reads the policy when torch loads it, so this must run before torch is
# imported (it does for the ``gradfix`` command); a choice already in the environment is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from importlib import import_module
from typing import Any

from gradfix.diagnostics import DescentReport, descent_report, sign_agreement
from gradfix.errors import CheckpointError, ConfigError, DataError, GradfixError, MismatchError
from gradfix.masking import mask_task_vector, reference_signs, transport
from gradfix.merge import mask_then_merge, merge_task_vectors, merge_then_mask, multi_source_merge
from gradfix.methods import METHODS, register_method, resolve_method
from gradfix.methods.autotune import choose_on_shots, choose_on_validation, gated
from gradfix.ops.masks import MASKS, register_mask
from gradfix.settings import MaskSettings, VoteSettings
from gradfix.task_vector import TaskVector, random_task_vector
from gradfix.votes import SignVotes, estimate_signs

__version__ = "0.1.0"

_LAZY = {
    "RECIPES": "gradfix.recipes",
    "load_recipe": "gradfix.recipes",
    "evaluate_model": "gradfix.jobs",
    "merge_checkpoints": "gradfix.jobs",
    "transport_checkpoints": "gradfix.jobs",
}


def __getattr__(name: str) -> Any:
    """Recipes and checkpoint jobs, imported on first use."""
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gradfix' has no attribute {name!r}")


__all__ = [
    "MASKS",
    "METHODS",
    "RECIPES",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DescentReport",
    "GradfixError",
    "MaskSettings",
    "MismatchError",
    "SignVotes",
    "TaskVector",
    "VoteSettings",
    "__version__",
    "choose_on_shots",
    "choose_on_validation",
    "descent_report",
    "estimate_signs",
    "evaluate_model",
    "gated",
    "load_recipe",
    "mask_task_vector",
    "mask_then_merge",
    "merge_checkpoints",
    "merge_task_vectors",
    "merge_then_mask",
    "multi_source_merge",
    "random_task_vector",
    "reference_signs",
    "register_mask",
    "register_method",
    "resolve_method",
    "sign_agreement",
    "transport",
    "transport_checkpoints",
]
