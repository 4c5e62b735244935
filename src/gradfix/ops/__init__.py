"""Pure per-tensor functions: sign estimators, masks and merges. No I/O, no models."""

from gradfix.ops.masks import (
    MASKS,
    agreement_mask,
    apply_mask,
    confidence_weight,
    magnitude_scaled_mask,
    random_sign_task_vector,
    sign_forcing,
    vote_margin_gate,
)
from gradfix.ops.merging import (
    disjoint_mean,
    elect_sign,
    magnitude_threshold,
    task_arithmetic,
    ties_merge,
    trim,
)
from gradfix.ops.signs import (
    consensus_sign,
    count_dtype,
    majority_sign,
    mean_sign,
    sign_votes,
)

__all__ = [
    "MASKS",
    "agreement_mask",
    "apply_mask",
    "confidence_weight",
    "consensus_sign",
    "count_dtype",
    "disjoint_mean",
    "elect_sign",
    "magnitude_scaled_mask",
    "magnitude_threshold",
    "majority_sign",
    "mean_sign",
    "random_sign_task_vector",
    "sign_forcing",
    "sign_votes",
    "task_arithmetic",
    "ties_merge",
    "trim",
    "vote_margin_gate",
]
