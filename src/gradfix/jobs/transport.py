"""The transport job: ``τ_A`` from two checkpoints onto a third, written as a complete model folder.

The method (:mod:`gradfix.methods`) resolves the settings; this module only orchestrates: check
the inputs and the output before any long work, vote on the target, choose ``(t, α)`` when the
method chooses, and stream ``θ_B + α · mask(τ_A)`` through the one output loop
(:mod:`gradfix.jobs.output`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from gradfix.data import Example, label_set
from gradfix.errors import ConfigError
from gradfix.io import CheckpointReader, atomic_output_dir, open_checkpoint
from gradfix.io.hub import parse_hub_id, resolve_models
from gradfix.jobs.adapter_output import AdapterOutput, check_out_format, prepare_adapter, write_adapter
from gradfix.jobs.adaptive import check_evidence, choice_record, choose, plan_choice
from gradfix.jobs.check_votes import state_verdict
from gradfix.jobs.common import (
    Shots,
    align_names,
    draw_shots,
    load_target,
    open_task_vector,
    save_votes,
    vote_on_target,
)
from gradfix.jobs.descent import PendingDescent, descent_inner, vote_gradient, with_inner
from gradfix.jobs.inputs import (
    check_outputs,
    check_votes_files,
    data_record,
    input_record,
    load_votes,
    validate_votes_files,
)
from gradfix.jobs.output import MaskedUpdate, finish_output, write_model
from gradfix.jobs.replay import pin_hub_inputs, transport_options
from gradfix.jobs.signs import check_signs, signs_on_shots, signs_record, uses_finetune
from gradfix.jobs.transport_aligned import transport_aligned
from gradfix.jobs.transport_record import settings_record, start_record
from gradfix.masking import TauRows, VoteReference, uncovered_tensors, unvoted_error
from gradfix.methods import fixed_alpha, resolve_method
from gradfix.methods.adaptive import ChoicePlan, gate_mask
from gradfix.methods.aligned import AlignedMethod
from gradfix.ops.masks import MaskOptions, get_mask
from gradfix.settings import DEFAULT_SHARD_BYTES, MaskSettings, VoteSettings
from gradfix.votes import SignVotes
from gradfix.votes.distributed import world
from gradfix.votes.estimate import Gradient
from gradfix.votes.finetune import finetune_fold_signs


@dataclass
class _Votes:
    """The target's votes as the job holds them: a streamed reference, and what the choice needs."""

    reference: VoteReference
    recipe: Any = None
    model: Any = None  # the target's loaded model, kept only to choose on
    combined: SignVotes | None = None  # every vote in memory, only to choose on a validation file
    pending: PendingDescent | None = None  # counts only: the descent report's backward, still to run


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
    method: str | None = None,
    out_format: str = "full",
    adapter_rank: int | None = None,
    revision: str | None = None,
) -> dict[str, Any]:
    """Transport ``τ_A = source_finetuned − source_base`` onto ``target_base`` and write ``out``.

    A model that is a Hugging Face Hub id (``org/name``, ``org/name@rev``) is resolved to its
    snapshot in the local cache, downloaded if need be, at ``revision`` unless it names its own
    (:func:`gradfix.io.hub.resolve_model`).

    ``method`` is a registered method (:data:`gradfix.methods.METHODS`), resolved with
    ``masking`` as the command line resolves it (:func:`gradfix.methods.resolve_method`: no
    method is ``adaptive``, or ``gradfix`` when a mask is given). Votes come from the recipe on
    ``votes.data`` (``votes.shots`` per class, or every example with ``"all"``), from saved vote
    files (``votes_in``, added up), or both; ``votes_out`` saves the votes used (before the model
    is written). A mask that needs no reference (``none``) takes no vote.

    Before any long work the job refuses an output that is, lies inside or contains an input, an
    existing output without ``overwrite``, and checkpoints whose tensors differ; it stops on NaN or
    Inf in any input and on an all-zero ``τ_A``. Checkpoints and vote files are read, masked and
    written in row slices, so memory does not grow with the model. The output folder is written
    under a temporary name and moved into place only when complete, with a model card of its own
    (``README.md``) and the options that replay the job (``gradfix.yaml``; the record's ``"options"``).
    Returns the record written to ``out/gradfix.json``; a method that chooses records its choice
    under ``"choice"``.

    ``out_format="adapter"`` writes the update ``α · mask(τ_A)`` as a PEFT LoRA adapter of rank
    ``adapter_rank`` for the target instead (:mod:`gradfix.jobs.adapter_output`; not with the
    aligned methods), recorded under ``"adapter"``.

    A transport that votes states the verdict of ``gradfix check`` from the votes it took
    (:func:`gradfix.jobs.check_votes.verdict_from_votes`, no second vote), recorded under
    ``"check"``; when a permutation explains the disagreement, the adaptive method
    aligns ``τ_A`` by re-basin before choosing (recorded as ``"aligned_by": "transfusion"``).
    """
    hub_target = parse_hub_id(target_base)  # an adapter output names B as the user did: a Hub id stays one
    b_name = hub_target[0] if hub_target else str(target_base)
    votes, given = votes or VoteSettings(), masking or MaskSettings()
    chosen, masking = resolve_method(method, given)
    options = transport_options(
        source_base, source_finetuned, target_base, votes, given, chosen.name, shard_bytes, votes_in,
        revision=revision, out_format=out_format, adapter_rank=adapter_rank,
    )  # fmt: skip
    source_base, source_finetuned, target_base = resolve_models(
        (source_base, source_finetuned, target_base), revision
    )
    pin_hub_inputs(
        options,
        {"source_base": source_base, "source_finetuned": source_finetuned, "target_base": target_base},
    )
    as_adapter = check_out_format(out_format, adapter_rank, chosen.name, chosen.aligns)
    choosing = plan_choice(chosen, masking, votes, target_base)
    if isinstance(chosen, AlignedMethod):
        return transport_aligned(
            chosen,
            source_base,
            source_finetuned,
            target_base,
            Path(out),
            votes,
            masking,
            overwrite,
            shard_bytes,
            options,
        )
    out, files_in = Path(out), [Path(p) for p in votes_in]
    needs_votes = get_mask(str(masking.mask)).needs_reference
    data = votes.data if needs_votes else None
    inputs = [Path(source_base), Path(source_finetuned), Path(target_base), *files_in]
    inputs += [Path(p) for p in (votes.data, choosing.validation if choosing else None) if p]
    check_outputs(out, inputs, overwrite, votes_out)
    check_votes_files(files_in if needs_votes else [])
    drawn = draw_shots(target_base, votes) if data else None
    if choosing is not None:
        check_evidence(choosing, drawn)
    check_signs(votes, choosing is not None, drawn is not None)
    if needs_votes and not data and not files_in:
        raise ConfigError(f"the {masking.mask!r} mask needs votes: give --data (or --votes-in)")
    with ExitStack() as stack:
        rb = stack.enter_context(open_checkpoint(source_base))
        rt = stack.enter_context(open_checkpoint(target_base))
        tau, names, nonzero = open_task_vector(
            stack, (source_base, source_finetuned, target_base), rb, rt, masking.include, masking.exclude
        )
        adapter = prepare_adapter(b_name, rt, sorted(nonzero), adapter_rank or 0) if as_adapter else None
        record = start_record(source_base, source_finetuned, target_base, options)
        held = None
        if needs_votes:
            gradient = vote_gradient(str(masking.mask), bool(files_in or votes_out))
            voting = [n for n in names if n in nonzero]  # τ_A is zero elsewhere: no votes needed
            held = _collect_votes(
                record, rt, voting, votes, drawn, files_in, votes_out, choosing, overwrite, gradient
            )
            if world()[0] != 0:  # under torchrun only the first process writes
                return {**record, "written_by_another_process": True}
        record.update(settings_record(chosen.name, votes, masking, bool(data)))
        record.update(out_format=out_format, adapter_rank=adapter_rank)
        record["num_samples"] = held.reference.num_samples if held is not None else 0
        try:
            if held is not None:  # the verdict of gradfix check, from these votes
                bases = (source_base, target_base)
                tau = state_verdict(
                    record, chosen.name, (tau, rt), (names, nonzero), held.reference, bases, votes.seed
                )
            if choosing is not None:
                masking = _choose(choosing, masking, record, votes, (tau, rt), names, nonzero, held, drawn)
            _write(
                out, overwrite, shard_bytes, (tau, rt), names, nonzero, held, masking, votes, record, adapter
            )
        finally:
            if held is not None:
                held.reference.close()
    return record


def _collect_votes(
    record: dict[str, Any],
    target: CheckpointReader,
    names: Sequence[str],
    votes: VoteSettings,
    drawn: Shots | None,
    votes_in: Sequence[Path],
    votes_out: str | Path | None,
    choosing: ChoicePlan | None,
    overwrite: bool,
    gradient: Gradient = "sum",
) -> _Votes:
    """Vote on the target (when there is data) on the tensors ``names``, check the votes files,
    save the votes if asked. With ``gradient="none"`` the model is kept for the descent report's
    backward (:mod:`gradfix.jobs.descent`)."""
    fresh: list[SignVotes] = []
    record["votes_in"] = [input_record(p) for p in votes_in]
    recipe = model = pending = None
    if drawn is not None:
        voted, model, recipe, info = vote_on_target(
            target.path, votes, target.names(), names, drawn, gradient
        )
        record["data"] = {**data_record(drawn.data), **info}
        fresh.append(voted)
        if not voted.grad_sum:
            pending = PendingDescent(model, recipe, drawn, votes, target.names())
        model = model if choosing is not None else None
    validate_votes_files(votes_in, {n: target.shapes()[n] for n in names})
    combined = None
    on_validation = choosing is not None and choosing.validation is not None
    if world()[0] == 0 and (votes_out or on_validation):
        collected = [*load_votes(votes_in, target.shapes()), *fresh]
        combined = sum(collected[1:], collected[0]).with_estimator(votes.estimator)
        if votes_out:
            save_votes(combined, votes_out, overwrite)
    held = _Votes(VoteReference(fresh, votes_in, votes.estimator), recipe, model)
    held.combined = combined if on_validation else None
    held.pending = pending
    return held


def _choose(
    choosing: ChoicePlan,
    masking: MaskSettings,
    record: dict[str, Any],
    votes: VoteSettings,
    readers: tuple[TauRows, CheckpointReader],
    names: Sequence[str],
    nonzero: set[str],
    held: _Votes | None,
    drawn: Shots | None,
) -> MaskSettings:
    """Choose ``(t, α)``, record the choice, and return ``masking`` set to write it."""
    rows, rt = readers
    reference = held.reference if held is not None else None
    uncovered = uncovered_tensors(names, nonzero, reference)
    if uncovered and masking.unvoted == "error":
        raise unvoted_error(uncovered)  # before the choice, which would stop on them later
    model, recipe = (held.model, held.recipe) if held is not None else (None, None)
    if model is None:  # votes from files only: load the target to score the validation file
        assert choosing.examples is not None
        model, recipe, mapping = load_target(rt.path, votes, label_set(choosing.examples), rt.names(), names)
    else:
        mapping = align_names([n for n, _ in model.named_parameters()], rt.names())
    # the unvoted policy holds for every candidate, naive addition (t > 1) included
    dropped = set(uncovered) if masking.unvoted == "drop" else set()
    shapes = rt.shapes()
    tau = {n: rows.whole(n, shapes[n]) for n in names if n in nonzero and n not in dropped}
    combined = held.combined if held is not None else None
    shots = drawn.drawn if drawn is not None else None
    per_fold = None
    finetune = held is not None and shots is not None and uses_finetune(votes, record)
    if finetune:
        assert held is not None and shots is not None and recipe is not None  # loaded with the model
        held.reference.close()  # the votes' counts are not the signs any more
        held.combined = combined = held.pending = None
        per_fold = finetune_fold_signs(recipe.loss, seed=votes.seed)
        record["signs"] = signs_record(votes)
        record["check"]["signs_from"] = "finetune"
        if choosing.examples is not None:  # the validation choice scores masks of the final signs
            combined = _finetuned_reference(held, model, recipe, shots, mapping, votes)
    choice = choose(choosing, tau, combined, model, recipe, mapping, shots, votes, masking.unvoted, per_fold)
    if finetune and combined is None:  # after the folds' fine-tunes: one fine-tune's state at a time
        assert held is not None and shots is not None
        _finetuned_reference(held, model, recipe, shots, mapping, votes)
    if held is not None:
        held.model = held.combined = None  # the descent's backward keeps its own reference
    mask = gate_mask(choice.threshold)
    record.update(mask=mask, threshold=choice.threshold, alpha=choice.alpha, choice=choice_record(choice))
    if choosing.validation is not None:
        record["validation"] = {
            **data_record(choosing.validation),
            "num_examples": len(choosing.examples or []),
        }
    return replace(masking, mask=mask, alpha=choice.alpha, threshold=choice.threshold)


def _finetuned_reference(
    held: _Votes,
    model: nn.Module,
    recipe: Any,
    shots: Sequence[Example],
    mapping: Mapping[str, str],
    votes: VoteSettings,
) -> SignVotes:
    """The signs of a fine-tune of B on every shot, made the reference the written mask reads."""
    signs = signs_on_shots(model, recipe, shots, mapping, votes)
    held.reference = VoteReference([signs], estimator="mean")
    return signs


def _write(
    out: Path,
    overwrite: bool,
    shard_bytes: int,
    readers: tuple[TauRows, CheckpointReader],
    names: Sequence[str],
    nonzero: set[str],
    held: _Votes | None,
    masking: MaskSettings,
    votes: VoteSettings,
    record: dict[str, Any],
    adapter: AdapterOutput | None = None,
) -> None:
    """Stream ``θ_B + α · mask(τ_A)`` into ``out`` with the record and the target's other files
    (or, with ``adapter``, the update as a LoRA adapter with the record)."""
    tau, rt = readers
    mask = get_mask(str(masking.mask))
    reference = held.reference if held is not None else None
    uncovered = uncovered_tensors(names, nonzero, reference)
    if mask.needs_reference and uncovered and masking.unvoted == "error":
        raise unvoted_error(uncovered)
    alpha = fixed_alpha(masking.alpha)  # resolved: a number by now
    options = MaskOptions(gamma=masking.gamma, threshold=float(masking.threshold or 0.0), seed=votes.seed)
    keep = masking.unvoted == "keep"
    inner = None
    if held is not None and held.pending is not None:  # counts only: ḡ from one more backward
        shapes = rt.shapes()
        inner = descent_inner(held.pending, tau, shapes, names, held.reference, mask, options, keep)
        held.pending = None  # the model is no longer needed
    update = MaskedUpdate(tau, names, reference, mask, options, keep, alpha)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        if adapter is not None:
            record.update(write_adapter(tmp, rt, update, alpha, adapter))
        else:
            record["files"] = write_model(tmp, rt, update, alpha, shard_bytes)
        report = with_inner(update.report(), inner)
        finetuned = "signs" in record  # signs of a displacement, not of a gradient: no descent report
        record.update(
            kept_fraction=update.kept_fraction(),
            descent=report.to_dict() if report and not finetuned else None,
        )
        finish_output(tmp, rt.path, record, held.recipe if held is not None else None, adapter is None)
