"""The merge job: several task vectors onto one base, plain or with GradFix masks.

- one source base, several fine-tunes, no target: Task Arithmetic / TIES on that base;
- with a target base and one data file per task: *mask-then-merge* or *merge-then-mask*
  (consensus sign) transport of the multi-task merge (Sec. 5.2);
- several source bases, one task: *mask-then-merge* with the target's votes on that task
  (multi-source).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradfix.data import parse_shots
from gradfix.diagnostics import DescentReport, TensorDescent, descent_report
from gradfix.errors import ConfigError
from gradfix.io import atomic_output_dir, open_checkpoint
from gradfix.io.adapters import is_adapter_folder, open_adapter
from gradfix.io.hub import resolve_models
from gradfix.jobs.common import base_record, draw_shots, scan_rows, scan_task_vector, vote_on_target
from gradfix.jobs.inputs import (
    check_checkpoints,
    check_outputs,
    data_record,
    input_record,
    raise_zero_task_vector,
)
from gradfix.jobs.output import WholeUpdate, finish_output, write_model
from gradfix.jobs.replay import merge_options
from gradfix.masking import TauRows
from gradfix.merge import mask_then_merge, merge_task_vectors, merge_then_mask
from gradfix.methods.registry import fixed_alpha, is_auto
from gradfix.settings import (
    DEFAULT_ALPHA,
    DEFAULT_MERGE_MASK,
    DEFAULT_SHARD_BYTES,
    DEFAULT_THRESHOLD,
    Elect,
    MaskSettings,
    MergeMethod,
    MergeSettings,
    Pipeline,
    TrimScope,
    VoteSettings,
)
from gradfix.task_vector import TaskVector, float_names
from gradfix.votes import SignVotes
from gradfix.votes.distributed import world

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
    method: MergeMethod = "ties",
    pipeline: Pipeline = "plain",
    density: float = 0.2,
    elect: Elect = "mass",
    trim_scope: TrimScope = "tensor",
    weights: Sequence[float] | None = None,
    votes: VoteSettings | None = None,
    masking: MaskSettings | None = None,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    revision: str | None = None,
) -> dict[str, Any]:
    """Merge the task vectors of ``tasks`` onto ``target_base`` (default: the first source base).

    ``pipeline``: ``plain`` (merge, no mask), ``mask-then-merge`` (each ``τ^t`` masked with the
    target's votes on its own data, then merged) or ``merge-then-mask`` (merged, then masked with
    the consensus sign of the per-task votes). The result is ``θ_target + α · τ_merged`` with
    ``α = masking.alpha``. Inputs and outputs are checked as in
    :func:`~gradfix.jobs.transport_checkpoints` (every task's ``τ`` must be non-zero), and the output
    has a model card and ``gradfix.yaml`` likewise. Returns the record written to ``out/gradfix.json``.
    Models given as Hugging Face Hub ids are resolved at ``revision`` unless they name their own
    (:func:`gradfix.io.hub.resolve_model`).
    """
    if not tasks:
        raise ConfigError("merge needs at least one task (--source-finetuned)")
    tasks, target_base = _resolve_hub_ids(tasks, target_base, revision)
    if pipeline not in PIPELINES:
        raise ConfigError(f"unknown pipeline {pipeline!r}; choose one of {', '.join(PIPELINES)}")
    votes = votes or VoteSettings()
    masking = _resolve_masking(masking or MaskSettings())
    chosen = list(weights) if weights is not None else None
    merging = MergeSettings(method, pipeline, density, elect, trim_scope, chosen)
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
    names, target_names, changed = _checked_names(tasks, target, masking)
    record = base_record("merge")
    record["options"] = merge_options(tasks, target, merging, votes, masking, shard_bytes)
    record["inputs"] = {"target_base": input_record(target, model_files=True)}
    record["tasks"] = [
        {"source_base": input_record(t.source_base), "source_finetuned": input_record(t.source_finetuned)}
        for t in tasks
    ]
    references: list[SignVotes] = []
    for i, (task, shots) in enumerate(zip(tasks, drawn, strict=False)):
        settings = replace(votes, data=task.data)
        voting = [n for n in names if n in changed]  # every task's τ is zero elsewhere: no votes needed
        task_votes, _, _, info = vote_on_target(target, settings, target_names, voting, shots)
        record["tasks"][i]["data"] = {**data_record(str(task.data)), **info}
        references.append(task_votes)
    mask_options = {
        "gamma": masking.gamma,
        "seed": votes.seed,
        "unvoted": masking.unvoted,
        "threshold": masking.threshold,
    }
    lazy = _LazyMerge(tasks, names, merging, masking, mask_options, references)
    merged: Mapping[str, Tensor] = lazy
    if trim_scope == "model" and method == "ties":  # one threshold over every tensor: merge in memory
        merged = lazy.materialise()
    if world()[0] != 0:  # under torchrun only the first process writes
        return {**record, "written_by_another_process": True}
    record.update(_settings_record(merging, masking, votes))
    with atomic_output_dir(out, overwrite=overwrite) as tmp, ExitStack() as stack:
        # the merged tensors are computed while they are written, with every source open once
        lazy.sources = [_open_task(stack, t) for t in tasks]
        target_reader = stack.enter_context(open_checkpoint(target))
        record["files"] = write_model(tmp, target_reader, WholeUpdate(merged), lazy.alpha, shard_bytes)
        lazy.finish(record)
        finish_output(tmp, target, record)
    return record


def _resolve_masking(masking: MaskSettings) -> MaskSettings:
    """A merge's mask settings with the defaults filled in; choosing (``auto``, grids) is refused."""
    if is_auto(masking.alpha) or any(
        v is not None for v in (masking.thresholds, masking.alphas, masking.validation)
    ):
        raise ConfigError("merge takes a fixed --alpha; choosing t and α (auto) is for transport")
    return replace(
        masking,
        mask=masking.mask if masking.mask is not None else DEFAULT_MERGE_MASK,
        alpha=fixed_alpha(masking.alpha if masking.alpha is not None else DEFAULT_ALPHA),
        threshold=masking.threshold if masking.threshold is not None else DEFAULT_THRESHOLD,
    )


def _resolve_hub_ids(
    tasks: Sequence[TaskSpec], target_base: str | Path | None, revision: str | None
) -> tuple[list[TaskSpec], str | Path | None]:
    """``tasks`` and ``target_base`` with every Hub id replaced by its local snapshot folder."""
    given = [p for t in tasks for p in (t.source_base, t.source_finetuned)]
    local = resolve_models([*given, *([target_base] if target_base is not None else [])], revision)
    resolved = [
        replace(t, source_base=str(local[2 * i]), source_finetuned=str(local[2 * i + 1]))
        for i, t in enumerate(tasks)
    ]
    return resolved, (local[-1] if target_base is not None else None)


def _checked_names(
    tasks: Sequence[TaskSpec], target: Path, masking: MaskSettings
) -> tuple[list[str], list[str], set[str]]:
    """The merged tensor names (checked in every checkpoint), the target's names, and the merged
    tensors that some task changes (the only ones voted on).

    A task given as a PEFT LoRA adapter folder changes only the tensors it adapts; when every task
    is an adapter, only the tensors some adapter changes are merged. Every task's ``τ`` is scanned
    slice by slice for NaN/Inf and must be non-zero, before any vote.
    """
    readers: dict[str, Any] = {}
    touched: set[str] = set()
    try:
        for i, task in enumerate(tasks):
            base = open_checkpoint(task.source_base)
            readers[f"task {i + 1} source base {task.source_base}"] = base
            if is_adapter_folder(task.source_finetuned):
                with open_adapter(task.source_finetuned, base.names(), base.shapes()) as adapter:
                    touched.update(adapter.names())
            else:
                label = f"task {i + 1} source fine-tuned {task.source_finetuned}"
                readers[label] = open_checkpoint(task.source_finetuned)
                touched.update(base.names())
        readers[f"target base {target}"] = open_checkpoint(target)
        sources_only = [r for label, r in readers.items() if not label.startswith("target base")]
        names = float_names(
            *(r.dtypes() for r in sources_only), include=masking.include, exclude=masking.exclude
        )
        names = [n for n in names if n in touched]
        check_checkpoints(readers, names, tasks[0].source_finetuned)
        target_names = readers[f"target base {target}"].names()
    finally:
        for reader in readers.values():
            reader.close()
    changed: set[str] = set()
    for i, t in enumerate(tasks):
        with ExitStack() as stack:
            source = _open_task(stack, t)
            task_names = [n for n in names if n in source.touched]
            tau = source.tau
            if tau.finetuned is not None and tau.base is not None:
                nonzero = scan_task_vector(tau.base, tau.finetuned, task_names)
            else:
                nonzero = scan_rows(tau, task_names, source.shapes, t.source_finetuned)
            if not nonzero:
                raise_zero_task_vector(
                    len(task_names), t.source_base, t.source_finetuned, f"the task vector of task {i + 1}"
                )
            changed |= nonzero
    return names, target_names, changed


@dataclass
class _OpenTask:
    """One task's ``τ`` as rows (from a fine-tuned checkpoint or an adapter) and the tensors it
    can change (an adapter's modules; every tensor of a checkpoint)."""

    tau: TauRows
    touched: frozenset[str]
    shapes: Mapping[str, tuple[int, ...]]

    def whole(self, name: str) -> Tensor:
        """``τ`` of tensor ``name`` in float32 (zeros where this task changes nothing)."""
        shape = tuple(self.shapes[name])
        if name not in self.touched:
            return torch.zeros(shape)
        return self.tau.whole(name, shape).float()


def _open_task(stack: ExitStack, task: TaskSpec) -> _OpenTask:
    """Open one task's sources on ``stack``."""
    base = stack.enter_context(open_checkpoint(task.source_base))
    shapes = base.shapes()
    if is_adapter_folder(task.source_finetuned):
        adapter = stack.enter_context(open_adapter(task.source_finetuned, base.names(), shapes))
        return _OpenTask(TauRows(base=base, adapter=adapter), frozenset(adapter.names()), shapes)
    finetuned = stack.enter_context(open_checkpoint(task.source_finetuned))
    return _OpenTask(TauRows(base=base, finetuned=finetuned), frozenset(base.names()), shapes)


def _settings_record(merging: MergeSettings, masking: MaskSettings, votes: VoteSettings) -> dict[str, Any]:
    """The settings of a merge as ``gradfix.json`` records them."""
    return {
        "method": merging.method,
        "pipeline": merging.pipeline,
        "density": merging.density,
        "elect": merging.elect,
        "trim_scope": merging.trim_scope,
        "weights": merging.weights,
        "alpha": masking.alpha,
        "mask": masking.mask,
        "threshold": masking.threshold,
        "gamma": masking.gamma,
        "recipe": votes.recipe,
        "shots": parse_shots(votes.shots) if merging.pipeline != "plain" else votes.shots,
        "seed": votes.seed,
        "estimator": votes.estimator,
        "include": masking.include,
        "exclude": masking.exclude,
    }


class _LazyMerge(Mapping[str, Tensor]):
    """The merged task vector, computed one tensor at a time when it is read.

    Each tensor name reads every task's base and fine-tune tensor, forms ``τ^t``, merges (and
    masks) that one tensor, and records its non-zero share and ``⟨ḡ, Δ⟩`` against the pooled votes.
    Per-tensor TIES trimming and the masks work tensor by tensor, so the result is the same as
    merging whole task vectors.
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        names: Sequence[str],
        merging: MergeSettings,
        masking: MaskSettings,
        mask_options: dict[str, Any],
        references: list[SignVotes],
    ):
        self.tasks, self.names = list(tasks), list(names)
        self._selected = set(self.names)
        self.sources: list[_OpenTask] = []
        self.method, self.pipeline, self.masking = merging.method, merging.pipeline, masking
        self.alpha = fixed_alpha(masking.alpha)  # resolved: a number
        self.mask = masking.mask or DEFAULT_MERGE_MASK
        self.merge_options: dict[str, Any] = {
            "density": merging.density,
            "elect": merging.elect,
            "trim_scope": merging.trim_scope,
            "weights": merging.weights,
        }
        self.mask_options = mask_options
        self.references = references
        self.pooled = sum(references[1:], references[0]) if references else None
        self.rows: list[TensorDescent] = []
        self.nonzero: dict[str, float] = {}

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __contains__(self, name: object) -> bool:  # without computing the tensor
        return name in self._selected

    def __len__(self) -> int:
        return len(self.names)

    def _task_tensors(self, name: str) -> list[TaskVector]:
        return [TaskVector({name: source.whole(name)}) for source in self.sources]

    def _combine(self, taus: Sequence[Mapping[str, Tensor]], refs: Sequence[Any]) -> TaskVector:
        if self.pipeline == "plain":
            return merge_task_vectors(taus, self.method, **self.merge_options)
        combine = mask_then_merge if self.pipeline == "mask-then-merge" else merge_then_mask
        return combine(
            taus,
            refs,
            mask=self.mask,
            method=self.method,
            mask_options=self.mask_options,
            **self.merge_options,
        )

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.names:
            raise KeyError(name)
        refs = [_only(r, name) for r in self.references]
        merged = self._combine(self._task_tensors(name), refs)[name]
        self.nonzero[name] = float((merged != 0).double().mean())
        if self.pooled is not None:
            self.rows += descent_report(_only(self.pooled, name), {name: merged}, None, self.alpha).tensors
        return merged

    def materialise(self) -> TaskVector:
        """Every tensor merged at once (needed when TIES trims over the whole model)."""
        with ExitStack() as stack:
            sources = [_open_task(stack, t) for t in self.tasks]
            taus = [TaskVector({n: source.whole(n) for n in self.names}) for source in sources]
        merged = self._combine(taus, self.references)
        self.nonzero = {n: float((merged[n] != 0).double().mean()) for n in merged}
        if self.pooled is not None:
            self.rows = descent_report(self.pooled, merged, None, self.alpha).tensors
        return merged

    def finish(self, record: dict[str, Any]) -> None:
        """Write the statistics gathered while merging into ``record``."""
        report = DescentReport(self.rows, self.alpha).to_dict() if self.pooled is not None else None
        record.update(descent=report, nonzero_fraction=dict(sorted(self.nonzero.items())))


def _only(votes: SignVotes, name: str) -> SignVotes:
    """The votes on one tensor (none for a tensor no task changes: it was not voted on)."""
    if name not in votes.shapes():
        return SignVotes({}, {}, votes.num_samples, votes.estimator, {name: 0})
    return SignVotes(
        {name: votes.counts[name]} if votes.counts else {},
        {name: votes.grad_sum[name]} if votes.grad_sum else {},
        votes.num_samples,
        votes.estimator,
        {name: votes.hits.get(name, 0)},
    )
