"""gradfix: carry a fine-tune across base-model releases.

GradFix moves a task vector ``τ_A = θ_A^ft − θ_A`` onto a new base ``θ_B`` by keeping only the
coordinates whose sign agrees with the target's anti-gradient, estimated by a majority vote over
per-sample gradients on a few labelled examples: ``θ_B + α · (m ⊙ τ_A)``.

>>> from gradfix import TaskVector, estimate_signs, transport
>>> tau = TaskVector.from_checkpoints("A-base/", "A-finetuned/")          # doctest: +SKIP
>>> votes = estimate_signs(model_b, batches, loss_fn)                     # doctest: +SKIP
>>> new_sd = transport(model_b.state_dict(), tau, votes, alpha=1.0)       # doctest: +SKIP
"""

from gradfix.diagnostics import DescentReport, descent_report, sign_agreement
from gradfix.errors import CheckpointError, ConfigError, DataError, GradfixError, MismatchError
from gradfix.masking import mask_task_vector, reference_signs, transport
from gradfix.task_vector import TaskVector, random_task_vector
from gradfix.votes import SignVotes, estimate_signs

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DescentReport",
    "GradfixError",
    "MismatchError",
    "SignVotes",
    "TaskVector",
    "__version__",
    "descent_report",
    "estimate_signs",
    "mask_task_vector",
    "random_task_vector",
    "reference_signs",
    "sign_agreement",
    "transport",
]
