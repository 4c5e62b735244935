"""Checkpoint-to-checkpoint jobs behind the command line: transport, merge, evaluate."""

from gradfix.jobs.common import MaskSettings, VoteSettings, align_names, input_record
from gradfix.jobs.evaluate import evaluate_model
from gradfix.jobs.merge import TaskSpec, merge_checkpoints
from gradfix.jobs.transport import transport_checkpoints

__all__ = [
    "MaskSettings",
    "TaskSpec",
    "VoteSettings",
    "align_names",
    "evaluate_model",
    "input_record",
    "merge_checkpoints",
    "transport_checkpoints",
]
