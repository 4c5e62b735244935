"""What ``gradfix.json`` of a transport records: its header and its settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradfix.data import parse_shots
from gradfix.jobs.common import base_record
from gradfix.jobs.inputs import input_record
from gradfix.settings import MaskSettings, VoteSettings


def start_record(
    source_base: str | Path, source_finetuned: str | Path, target_base: str | Path, options: dict[str, Any]
) -> dict[str, Any]:
    """``gradfix.json``'s header, the job's options (to replay it) and the sha256 of the three checkpoints."""
    record = base_record("transport")
    record["options"] = options
    record["inputs"] = {
        "source_base": input_record(source_base),
        "source_finetuned": input_record(source_finetuned),
        "target_base": input_record(target_base, model_files=True),
    }
    return record


def settings_record(method: str, votes: VoteSettings, masking: MaskSettings, voted: bool) -> dict[str, Any]:
    """The settings of a transport as ``gradfix.json`` records them."""
    return {
        "method": method,
        "recipe": votes.recipe,
        "shots": parse_shots(votes.shots) if voted else votes.shots,
        "seed": votes.seed,
        "estimator": votes.estimator,
        "engine": votes.engine,
        "template": votes.template,
        "mask": masking.mask,
        "alpha": masking.alpha,
        "include": masking.include,
        "exclude": masking.exclude,
        "unvoted": masking.unvoted,
        "gamma": masking.gamma,
        "threshold": masking.threshold,
    }
