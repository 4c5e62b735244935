"""The transport job: ``τ_A`` from two checkpoints onto a third, written as a complete model folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradfix.checks import check_same_architecture, select_names
from gradfix.diagnostics import descent_report
from gradfix.errors import ConfigError
from gradfix.io import atomic_output_dir, check_output_not_input, open_checkpoint
from gradfix.jobs.common import (
    DEFAULT_SHARD_BYTES,
    MaskSettings,
    VoteSettings,
    base_record,
    input_record,
    vote_on_target,
    write_model,
)
from gradfix.task_vector import TaskVector
from gradfix.transport import mask_task_vector
from gradfix.votes import SignVotes


def transport_checkpoints(
    source_base: str | Path,
    source_finetuned: str | Path,
    target_base: str | Path,
    out: str | Path,
    votes: VoteSettings | None = None,
    masking: MaskSettings | None = None,
    *,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    votes_in: Sequence[str | Path] = (),
    votes_out: str | Path | None = None,
) -> dict[str, Any]:
    """Transport ``τ_A = source_finetuned − source_base`` onto ``target_base`` and write ``out``.

    Votes come from the recipe on ``votes.data`` (``votes.shots`` per class), from saved vote
    files (``votes_in``, added up), or both. With ``masking.mask == "none"`` no vote is taken
    (naive transport). Returns the record written to ``out/gradfix.json``.
    """
    votes = votes or VoteSettings()
    masking = masking or MaskSettings()
    out = Path(out)
    inputs = [Path(source_base), Path(source_finetuned), Path(target_base)]
    check_output_not_input(out, inputs)
    with (
        open_checkpoint(source_base) as rb,
        open_checkpoint(source_finetuned) as rf,
        open_checkpoint(target_base) as rt,
    ):
        dtypes = rf.dtypes()
        names = [
            n
            for n in select_names(rf.names(), masking.include, masking.exclude)
            if dtypes[n].is_floating_point
        ]
        if not names:
            raise ConfigError("no floating-point tensor is left after the --include/--exclude filters")
        check_same_architecture(
            {
                f"source base {source_base}": rb.shapes(),
                f"source fine-tune {source_finetuned}": rf.shapes(),
                f"target base {target_base}": rt.shapes(),
            },
            names,
        )
        target_names = rt.names()
    record = base_record("transport")
    record["inputs"] = {
        "source_base": input_record(source_base),
        "source_finetuned": input_record(source_finetuned),
        "target_base": input_record(target_base),
    }
    tau = TaskVector.from_checkpoints(source_base, source_finetuned, masking.include, masking.exclude)
    reference, recipe = None, None
    if masking.mask != "none":
        collected = [SignVotes.load(p) for p in votes_in]
        if votes.data:
            fresh, _, recipe, info = vote_on_target(target_base, votes, target_names, list(tau))
            record["data"] = {**input_record(votes.data), **info}
            collected.append(fresh)
        if not collected:
            raise ConfigError(f"the {masking.mask!r} mask needs votes: give --data (or --votes-in)")
        reference = sum(collected[1:], collected[0]).with_estimator(votes.estimator)
        if votes_out:
            reference.save(votes_out)
    masked = mask_task_vector(
        tau, reference, masking.mask, gamma=masking.gamma, seed=votes.seed, unvoted=masking.unvoted
    )
    report = descent_report(reference, masked, tau, masking.alpha) if reference is not None else None
    record.update(
        recipe=votes.recipe,
        shots=votes.shots,
        seed=votes.seed,
        estimator=votes.estimator,
        engine=votes.engine,
        template=votes.template,
        mask=masking.mask,
        alpha=masking.alpha,
        include=masking.include,
        exclude=masking.exclude,
        unvoted=masking.unvoted,
        gamma=masking.gamma,
        num_samples=reference.num_samples if reference is not None else 0,
        kept_fraction={n: float((masked[n] * tau[n] > 0).double().mean()) for n in tau},
        descent=report.to_dict() if report else None,
    )
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        record["files"] = write_model(tmp, target_base, masked, masking.alpha, shard_bytes, record, recipe)
    return record
