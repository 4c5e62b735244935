"""The merge job: several task vectors onto one base, plain or with GradFix masks.

- one source base, several fine-tunes, no target: Task Arithmetic / TIES on that base;
- with a target base and one data file per task: *mask-then-merge* or *merge-then-mask*
  (consensus sign) transport of the multi-task merge (Sec. 5.2);
- several source bases, one task: *mask-then-merge* with the target's votes on that task
  (multi-source).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gradfix.data import parse_shots
from gradfix.diagnostics import descent_report
from gradfix.distributed import world
from gradfix.errors import ConfigError
from gradfix.io import atomic_output_dir, open_checkpoint
from gradfix.jobs.common import (
    DEFAULT_SHARD_BYTES,
    MaskSettings,
    VoteSettings,
    base_record,
    draw_shots,
    vote_on_target,
    write_model,
)
from gradfix.jobs.inputs import check_checkpoints, check_outputs, check_task_vector_nonzero, input_record
from gradfix.merge import mask_then_merge, merge_task_vectors, merge_then_mask
from gradfix.task_vector import TaskVector, float_names
from gradfix.votes import SignVotes

PIPELINES = ("plain", "mask-then-merge", "merge-then-mask")


@dataclass(frozen=True)
class TaskSpec:
    """One task vector to merge: ``source_finetuned − source_base``, voted on with ``data``."""

    source_base: str
    source_finetuned: str
    data: str | None = None


def merge_checkpoints(
    tasks: Sequence[TaskSpec],
    out: str | Path,
    target_base: str | Path | None = None,
    *,
    method: str = "ties",
    pipeline: str = "plain",
    density: float = 0.2,
    elect: str = "mass",
    trim_scope: str = "tensor",
    weights: Sequence[float] | None = None,
    votes: VoteSettings | None = None,
    masking: MaskSettings | None = None,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict[str, Any]:
    """Merge the task vectors of ``tasks`` onto ``target_base`` (default: the first source base).

    ``pipeline``: ``plain`` (merge, no mask), ``mask-then-merge`` (each ``τ^t`` masked with the
    target's votes on its own data, then merged) or ``merge-then-mask`` (merged, then masked with
    the consensus sign of the per-task votes). The result is ``θ_target + α · τ_merged`` with
    ``α = masking.alpha``. Inputs and outputs are checked as in
    :func:`~gradfix.jobs.transport_checkpoints` (every task's ``τ`` must be non-zero). Returns the
    record written to ``out/gradfix.json``.
    """
    if not tasks:
        raise ConfigError("merge needs at least one task (--source-finetuned)")
    if pipeline not in PIPELINES:
        raise ConfigError(f"unknown pipeline {pipeline!r}; choose one of {', '.join(PIPELINES)}")
    votes = votes or VoteSettings()
    masking = masking or MaskSettings()
    target = Path(target_base) if target_base is not None else Path(tasks[0].source_base)
    out = Path(out)
    sources = [Path(p) for t in tasks for p in (t.source_base, t.source_finetuned)]
    data_files = [Path(t.data) for t in tasks if t.data]
    check_outputs(out, list(dict.fromkeys([target, *sources, *data_files])), overwrite)
    drawn = []
    if pipeline != "plain":
        if any(t.data is None for t in tasks):
            raise ConfigError(f"the {pipeline} pipeline needs a data file for every task (--data)")
        drawn = [draw_shots(target, replace(votes, data=t.data)) for t in tasks]
    readers: dict[str, Any] = {}
    try:
        for i, task in enumerate(tasks):
            for role in ("source_base", "source_finetuned"):
                label = f"task {i + 1} {role.replace('_', ' ')} {getattr(task, role)}"
                readers[label] = open_checkpoint(getattr(task, role))
        readers[f"target base {target}"] = open_checkpoint(target)
        sources_only = [r for label, r in readers.items() if not label.startswith("target base")]
        names = float_names(
            *(r.dtypes() for r in sources_only), include=masking.include, exclude=masking.exclude
        )
        check_checkpoints(readers, names, tasks[0].source_finetuned)
        target_names = readers[f"target base {target}"].names()
    finally:
        for reader in readers.values():
            reader.close()
    record = base_record("merge")
    record["inputs"] = {"target_base": input_record(target, model_files=True)}
    record["tasks"] = [
        {"source_base": input_record(t.source_base), "source_finetuned": input_record(t.source_finetuned)}
        for t in tasks
    ]
    tvs = []
    for i, t in enumerate(tasks):
        tau = TaskVector.from_checkpoints(t.source_base, t.source_finetuned, masking.include, masking.exclude)
        check_task_vector_nonzero(tau, t.source_base, t.source_finetuned, f"the task vector of task {i + 1}")
        tvs.append(tau)
    merge_options = {"density": density, "elect": elect, "trim_scope": trim_scope, "weights": weights}
    references: list[SignVotes] = []
    if pipeline == "plain":
        merged = merge_task_vectors(tvs, method, **merge_options)
    else:
        for i, task in enumerate(tasks):
            settings = replace(votes, data=task.data)
            task_votes, _, _, info = vote_on_target(target, settings, target_names, names, drawn[i])
            record["tasks"][i]["data"] = {**input_record(str(task.data)), **info}
            references.append(task_votes)
        combine = mask_then_merge if pipeline == "mask-then-merge" else merge_then_mask
        mask_options = {"gamma": masking.gamma, "seed": votes.seed, "unvoted": masking.unvoted}
        merged = combine(
            tvs, references, mask=masking.mask, method=method, mask_options=mask_options, **merge_options
        )
    report = None
    if references:
        pooled = sum(references[1:], references[0])
        report = descent_report(pooled, merged, None, masking.alpha).to_dict()
    record.update(
        method=method,
        pipeline=pipeline,
        density=density,
        elect=elect,
        trim_scope=trim_scope,
        weights=list(weights) if weights is not None else None,
        alpha=masking.alpha,
        mask=masking.mask,
        recipe=votes.recipe,
        shots=parse_shots(votes.shots) if pipeline != "plain" else votes.shots,
        seed=votes.seed,
        estimator=votes.estimator,
        include=masking.include,
        exclude=masking.exclude,
        descent=report,
        nonzero_fraction={n: float((merged[n] != 0).double().mean()) for n in merged},
    )
    if world()[0] != 0:  # under torchrun only the first process writes
        return {**record, "written_by_another_process": True}
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        record["files"] = write_model(tmp, target, merged, masking.alpha, shard_bytes, record)
    return record
