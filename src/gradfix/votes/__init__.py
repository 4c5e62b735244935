"""Per-sample gradient sign votes of the target (GradFix step 1).

- :mod:`~gradfix.votes.estimate`: :class:`SignVotes` and :func:`estimate_signs`;
- engines: :mod:`~gradfix.votes.per_sample` (loop, vmap), :mod:`~gradfix.votes.hooks` (one
  batched backward with per-layer rules from :mod:`~gradfix.votes.layers`);
- :mod:`~gradfix.votes.file`: the votes file (write, read, validate);
- :mod:`~gradfix.votes.native`: the C vote kernel;
- :mod:`~gradfix.votes.distributed`: votes summed over processes;
- :mod:`~gradfix.votes.finetune`: signs from the target's own few-shot fine-tune.
"""

from gradfix.votes.estimate import ENGINES, ESTIMATORS, SignVotes, estimate_signs
from gradfix.votes.finetune import finetune_signs

__all__ = ["ENGINES", "ESTIMATORS", "SignVotes", "estimate_signs", "finetune_signs"]
