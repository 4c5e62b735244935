"""Shared parts of the checkpoint-to-checkpoint jobs: drawing the shots, voting on the target.

Each job reads checkpoints tensor by tensor, votes on the target with a recipe, and writes a
complete output folder (:mod:`gradfix.jobs.output`) into a temporary folder that is moved into
place only when everything was written. The settings and their defaults live in
:mod:`gradfix.settings`.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradfix.checks import FiniteCheck, count_nonfinite
from gradfix.data import (
    ALL_SHOTS,
    UNLABELLED,
    Example,
    batched,
    check_known_labels,
    label_set,
    parse_shots,
    sample_shots,
)
from gradfix.errors import ConfigError, DataError
from gradfix.io import CheckpointReader, atomic_output_file, open_checkpoint, sort_safetensors_metadata
from gradfix.io.adapters import is_adapter_folder, open_adapter
from gradfix.io.checkpoint import row_slices
from gradfix.jobs.inputs import (
    HEAD_FILE,
    check_checkpoints,
    input_record,
    raise_zero_task_vector,
    target_label_set,
)
from gradfix.masking import TauRows
from gradfix.recipes import get_recipe, load_recipe
from gradfix.recipes.base import place_batch
from gradfix.recipes.placement import Placement, resolve_placement
from gradfix.settings import DEFAULT_SHARD_BYTES, MaskSettings, VoteSettings
from gradfix.task_vector import float_names
from gradfix.votes import SignVotes, estimate_signs
from gradfix.votes.distributed import all_reduce_votes, world
from gradfix.votes.estimate import Gradient

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "HEAD_FILE",
    "MaskSettings",
    "Shots",
    "VoteSettings",
    "align_names",
    "base_record",
    "draw_shots",
    "input_record",
    "load_target",
    "rename_votes",
    "save_votes",
    "scan_task_vector",
    "vote_on_target",
    "voting_placement",
]


def align_names(model_names: Sequence[str], checkpoint_names: Sequence[str]) -> dict[str, str]:
    """Map a loaded model's parameter names to the checkpoint's names.

    Handles checkpoints saved with or without the model's base prefix (``bert.`` ...): returns
    ``{model name: checkpoint name}`` for every model name that has a match.
    """
    ckpt = set(checkpoint_names)
    if all(n in ckpt for n in model_names):
        return {n: n for n in model_names}
    best: dict[str, str] = {}
    prefixes = {
        c[: len(c) - len(m)] for m in model_names[:50] for c in checkpoint_names if c.endswith("." + m)
    }
    prefixes |= {
        m[: len(m) - len(c)] for m in model_names[:50] for c in checkpoint_names if m.endswith("." + c)
    }
    for prefix in sorted(prefixes | {""}, key=len):
        mapping = {}
        for n in model_names:
            if prefix + n in ckpt:
                mapping[n] = prefix + n
            elif n.startswith(prefix) and n[len(prefix) :] in ckpt:
                mapping[n] = n[len(prefix) :]
        if len(mapping) > len(best):
            best = mapping
    return best


def rename_votes(votes: SignVotes, mapping: Mapping[str, str]) -> SignVotes:
    """``votes`` with each tensor renamed by ``mapping`` (tensors it does not name are left out)."""
    return SignVotes(
        counts={mapping[n]: c for n, c in votes.counts.items() if n in mapping},
        grad_sum={mapping[n]: g for n, g in votes.grad_sum.items() if n in mapping},
        num_samples=votes.num_samples,
        estimator=votes.estimator,
        hits={mapping[n]: h for n, h in votes.hits.items() if n in mapping},
    )


@dataclass(frozen=True)
class Shots:
    """The examples a target votes on: read, checked and drawn from one data file."""

    data: str
    examples: list[Example]
    labels: list[str]
    drawn: list[Example]


def draw_shots(target: str | Path, settings: VoteSettings) -> Shots:
    """Read ``settings.data``, check its labels against the target's and draw the shots.

    Cheap, so the jobs call it before any long work: a bad data file, an unknown label (when the
    target has a fixed label set) or too few examples of a class fail at once. Data without
    classes (every example :data:`~gradfix.data.UNLABELLED`, e.g. a language model's) are one
    pool: ``shots`` examples are drawn in all.
    """
    if not settings.data:
        raise ConfigError("voting needs a data file (--data)")
    shots_setting = parse_shots(settings.shots)
    examples = get_recipe(settings.recipe).read_examples(settings.data)
    labels = label_set(examples)
    known = target_label_set(settings.recipe, target)
    if known is not None:
        check_known_labels(examples, known[0], settings.data, known[1])
    if labels == [UNLABELLED] and shots_setting != ALL_SHOTS and int(shots_setting) > len(examples):
        raise DataError(
            f"{settings.data}: {shots_setting} shots requested but the file has {len(examples)} "
            "example(s); lower --shots or add examples"
        )
    drawn = sample_shots(examples, shots_setting, settings.seed, labels, source=settings.data)
    voting_placement(target, settings)  # a device or dtype this machine lacks fails here too
    return Shots(str(settings.data), examples, labels, drawn)


def voting_placement(target: str | Path, settings: VoteSettings) -> Placement:
    """Where and in which dtype ``target`` votes (``settings.device``, ``settings.dtype``): a
    :class:`ConfigError` for a device or dtype this machine cannot run
    (:func:`gradfix.recipes.placement.resolve_placement`)."""
    return resolve_placement(settings.device, settings.dtype, target)


def load_target(
    target: str | Path,
    settings: VoteSettings,
    labels: Sequence[str],
    checkpoint_names: Sequence[str],
    voted: Sequence[str],
) -> tuple[nn.Module, Any, dict[str, str]]:
    """Load the target with its recipe for ``labels``; only the parameters named in ``voted`` train.

    The model is loaded on ``settings.device`` in ``settings.dtype`` (:func:`voting_placement`).
    Returns the model, the recipe and ``{model parameter name: checkpoint name}``. The loaded
    parameters must be finite (one error names every tensor with NaN or Inf).
    """
    placement = voting_placement(target, settings)
    try:
        model, recipe = load_recipe(
            settings.recipe,
            target,
            labels,
            template=settings.template,
            max_length=settings.max_length,
            placement=placement,
        )
    except Exception:
        raise_if_nonfinite(target)  # NaN or Inf weights make recipes fail in many ways
        raise
    mapping = align_names([n for n, _ in model.named_parameters()], checkpoint_names)
    if any(count_nonfinite(p.detach()) for n, p in model.named_parameters() if n in mapping):
        raise_if_nonfinite(target)
    wanted = set(voted)
    for name, param in model.named_parameters():
        param.requires_grad_(mapping.get(name) in wanted)
    return model, recipe, mapping


def shot_batches(recipe: Any, model: nn.Module, examples: Sequence[Example], batch_size: int) -> list[Any]:
    """The examples collated by the recipe in batches of ``batch_size``, placed where ``model`` is."""
    return [place_batch(recipe.collate(chunk), model) for chunk in batched(list(examples), batch_size)]


def vote_on_target(
    target: str | Path,
    settings: VoteSettings,
    checkpoint_names: Sequence[str],
    voted: Sequence[str],
    shots: Shots | None = None,
    gradient: Gradient = "sum",
) -> tuple[SignVotes, nn.Module, Any, dict[str, Any]]:
    """Load the target with its recipe and vote on the shots (drawn here unless ``shots`` is given).

    Only the parameters whose checkpoint name is in ``voted`` take part (the rest are frozen: no
    gradient, no vote state), and the returned votes are keyed by checkpoint names; a job passes
    the tensors its task vectors change. ``gradient`` is :func:`~gradfix.votes.estimate_signs`'s
    (``"none"``: counts only). The loaded parameters must be finite. The returned info holds the
    labels, the number of examples, the number of votes, the data file lines of the examples
    drawn (in voting order), how many tensors and parameters voted (``voted_tensors``,
    ``voted_parameters``) with which gradient setting (``gradient``), and the ``device`` and
    ``dtype`` the votes were computed in.
    """
    shots = shots if shots is not None else draw_shots(target, settings)
    model, recipe, mapping = load_target(target, settings, shots.labels, checkpoint_names, voted)
    batches = shot_batches(recipe, model, shots.drawn, settings.batch_size)
    # under torchrun each process votes on every world_size-th batch (the same batches as one
    # process would form, so each sample's gradient is computed identically) and the counts add up
    rank, size = world()
    mine = batches[rank::size]
    if mine:
        votes = estimate_signs(
            model,
            mine,
            recipe.loss,
            settings.estimator,
            engine=settings.engine,
            progress=settings.progress and rank == 0,
            gradient=gradient,
        )
    else:  # more processes than batches
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        votes = SignVotes.zeros(trainable, settings.estimator, gradient)
    votes = all_reduce_votes(votes)
    _check_some_votes(votes, shots, settings.recipe)
    info = {
        "labels": shots.labels,
        "num_examples": len(shots.examples),
        "num_samples": votes.num_samples,
        "drawn_lines": [ex.line for ex in shots.drawn],
        "max_length": getattr(recipe, "max_length", None),
        "voted_tensors": len(votes.names()),
        "voted_parameters": sum(math.prod(s) for s in votes.shapes().values()),
        "gradient": "sum" if votes.grad_sum else "none",
        **voting_placement(target, settings).record(),
    }
    return rename_votes(votes, mapping), model, recipe, info


def _check_some_votes(votes: SignVotes, shots: Shots, recipe: str) -> None:
    """Raise when no sample gave any tensor a gradient because the data has a single class.

    With one class, a loss over the data's labels (a softmax over one logit) is constant, so the
    target gives no votes at all; saying so beats listing every tensor as unvoted later. Data
    without classes (:data:`~gradfix.data.UNLABELLED`) are not meant to have any.
    """
    if len(shots.labels) != 1 or shots.labels == [UNLABELLED]:
        return
    if not votes.names() or any(votes.hits.values()):
        return
    raise DataError(
        f"{shots.data}: every example has the label {shots.labels[0]!r}; with one class the {recipe} "
        "loss has no gradient, so the target gave no votes; give data with at least two labels"
    )


def scan_task_vector(base: CheckpointReader, finetuned: CheckpointReader, names: Sequence[str]) -> set[str]:
    """Read ``τ_A = finetuned − base`` slice by slice: raise on NaN/Inf, return the non-zero tensors."""
    finite = FiniteCheck()
    nonzero: set[str] = set()
    shapes = base.shapes()
    for name in names:
        for start, stop in row_slices(shapes[name]):
            b, f = base.rows(name, start, stop), finetuned.rows(name, start, stop)
            ok = finite.check(base.file_of(name), name, b) & finite.check(finetuned.file_of(name), name, f)
            if ok and name not in nonzero and bool((f.float() - b.float()).ne(0).any()):
                nonzero.add(name)
    finite.raise_if_any()
    return nonzero


def scan_rows(
    tau: TauRows, names: Sequence[str], shapes: Mapping[str, tuple[int, ...]], source: str | Path
) -> set[str]:
    """Read ``τ_A`` (an adapter's ``ΔW``) slice by slice: raise on NaN/Inf, return the non-zero tensors."""
    finite = FiniteCheck()
    nonzero: set[str] = set()
    for name in names:
        for start, stop in row_slices(shapes[name]):
            rows = tau.rows(name, start, stop)
            if finite.check(source, name, rows) and name not in nonzero and bool(rows.ne(0).any()):
                nonzero.add(name)
    finite.raise_if_any()
    return nonzero


def raise_if_nonfinite(checkpoint: str | Path) -> None:
    """Stream every tensor of ``checkpoint`` and raise one error naming those with NaN or Inf.

    Used to explain a failure (or non-finite parameters) after a model was loaded by a library, so
    that the normal path reads the checkpoint only once.
    """
    finite = FiniteCheck()
    with open_checkpoint(checkpoint) as reader:
        for name in reader.names():
            finite.check(reader.file_of(name), name, reader.get(name))
    finite.raise_if_any()


def save_votes(votes: SignVotes, path: str | Path, overwrite: bool = False) -> None:
    """Write ``votes`` to ``path`` atomically (a temporary file beside it, moved into place)."""
    with atomic_output_file(path, overwrite=overwrite) as tmp:
        votes.save(tmp)
        sort_safetensors_metadata(tmp)


def base_record(command: str) -> dict[str, Any]:
    """The start of ``gradfix.json``: the command and the versions that produced the output.

    Nothing in it varies between runs on the same software (no time stamps, no host names), so
    that the same inputs and settings give a byte-identical record.
    """
    from gradfix import __version__

    return {
        "command": command,
        "gradfix_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }


def open_task_vector(
    stack: ExitStack,
    paths: tuple[str | Path, str | Path, str | Path],
    rb: CheckpointReader,
    rt: CheckpointReader,
    include: Sequence[str],
    exclude: Sequence[str],
) -> tuple[TauRows, list[str], set[str]]:
    """``τ_A``'s rows, its checked tensor names and the non-zero ones, from a fine-tuned checkpoint
    or a PEFT LoRA adapter folder (``paths``: source base, source fine-tune, target base)."""
    source_base, source_finetuned, target_base = paths
    labelled = {f"source base {source_base}": rb, f"target base {target_base}": rt}
    if is_adapter_folder(source_finetuned):
        adapter = stack.enter_context(open_adapter(source_finetuned, rb.names(), rb.shapes()))
        dtypes = rb.dtypes()
        names = float_names({n: dtypes[n] for n in adapter.names()}, include=include, exclude=exclude)
        check_checkpoints(labelled, names, source_finetuned)
        tau = TauRows(base=rb, adapter=adapter)
        nonzero = scan_rows(tau, names, rb.shapes(), source_finetuned)
    else:
        rf = stack.enter_context(open_checkpoint(source_finetuned))
        names = float_names(rf.dtypes(), rb.dtypes(), include=include, exclude=exclude)
        check_checkpoints({**labelled, f"source fine-tune {source_finetuned}": rf}, names, source_finetuned)
        tau = TauRows(base=rb, finetuned=rf)
        nonzero = scan_task_vector(rb, rf, names)
    if not nonzero:
        raise_zero_task_vector(len(names), source_base, source_finetuned)
    return tau, names, nonzero
