"""The transport job: ``τ_A`` from two checkpoints onto a third, written as a complete model folder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from gradfix.data import label_set, parse_shots
from gradfix.diagnostics import descent_report
from gradfix.errors import ConfigError
from gradfix.io import CheckpointReader, atomic_output_dir, open_checkpoint
from gradfix.jobs.adaptive import (
    ChoicePlan,
    check_evidence,
    choice_record,
    choose,
    fixed_alpha,
    output_mask,
    plan_choice,
)
from gradfix.jobs.aligned import METHODS, aligned_task_vector
from gradfix.jobs.apply import (
    MaskPlan,
    VoteSource,
    scan_task_vector,
    stream_transport,
    uncovered_tensors,
    unvoted_error,
)
from gradfix.jobs.common import (
    DEFAULT_SHARD_BYTES,
    MaskSettings,
    Shots,
    VoteSettings,
    align_names,
    base_record,
    draw_shots,
    finish_output,
    load_target,
    save_votes,
    vote_on_target,
    write_model,
)
from gradfix.jobs.inputs import (
    check_checkpoints,
    check_outputs,
    check_task_vector_nonzero,
    check_votes_files,
    input_record,
    load_votes,
    raise_zero_task_vector,
    validate_votes_files,
)
from gradfix.masking import mask_task_vector
from gradfix.task_vector import TaskVector, float_names
from gradfix.votes import SignVotes
from gradfix.votes.distributed import world


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
    method: str = "gradfix",
) -> dict[str, Any]:
    """Transport ``τ_A = source_finetuned − source_base`` onto ``target_base`` and write ``out``.

    Votes come from the recipe on ``votes.data`` (``votes.shots`` per class, or every example
    with ``"all"``), from saved vote files (``votes_in``, added up), or both; ``votes_out`` saves
    the votes used (before the model is written, so a failed write loses no vote). With
    ``masking.mask == "none"`` no vote is taken (naive transport).

    Before any long work the job refuses an output that is, lies inside or contains an input, an
    existing output without ``overwrite``, and checkpoints whose tensors differ; it stops on NaN or
    Inf in any input and on an all-zero ``τ_A``. Checkpoints and vote files are read, masked and
    written in row slices, so memory does not grow with the model (see :mod:`gradfix.jobs.apply`).
    The output folder is written under a temporary name and moved into place only when complete.
    Returns the record written to ``out/gradfix.json`` (the sha256 of every input, the settings
    and the examples drawn).

    ``method`` ``gradfix`` (the default here) is the published algorithm: ``masking.mask``
    (agreement) and a fixed ``masking.alpha``. ``adaptive`` masks with the vote-margin gate and
    chooses its threshold ``t`` from ``masking.thresholds`` and, with ``masking.alpha == "auto"``,
    α from ``masking.alphas``: on ``masking.validation`` (accuracy) when given, else by 2-fold
    cross-validation over the shots (see :mod:`gradfix.jobs.adaptive`); ``gradfix`` with
    ``alpha="auto"`` chooses α alone. The record then holds the choice under ``"choice"`` and
    the chosen ``threshold`` and ``alpha``.

    ``method`` ``transfusion`` or ``theseus`` first carries ``τ_A`` into the target's coordinates
    (see :mod:`gradfix.jobs.aligned`; in memory, and for Theseus the target may differ in width),
    then masks it as ``masking.mask`` says.
    """
    votes = votes or VoteSettings()
    masking = masking or MaskSettings()
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    choosing = plan_choice(method, masking, votes, target_base)
    if choosing is None:
        masking = replace(masking, alpha=fixed_alpha(masking.alpha))
    if method in ("transfusion", "theseus"):
        return _transport_aligned(
            method,
            source_base,
            source_finetuned,
            target_base,
            Path(out),
            votes,
            masking,
            overwrite,
            shard_bytes,
        )
    out = Path(out)
    votes_in = [Path(p) for p in votes_in]
    data = votes.data if masking.mask != "none" else None
    inputs = [Path(source_base), Path(source_finetuned), Path(target_base), *votes_in]
    if votes.data:
        inputs.append(Path(votes.data))
    if choosing is not None and choosing.validation is not None:
        inputs.append(Path(choosing.validation))
    check_outputs(out, inputs, overwrite, votes_out)
    check_votes_files(votes_in if masking.mask != "none" else [])
    drawn = draw_shots(target_base, votes) if data else None
    if choosing is not None:
        check_evidence(choosing, drawn)
    if masking.mask != "none" and not data and not votes_in:
        raise ConfigError(f"the {masking.mask!r} mask needs votes: give --data (or --votes-in)")
    with (
        open_checkpoint(source_base) as rb,
        open_checkpoint(source_finetuned) as rf,
        open_checkpoint(target_base) as rt,
    ):
        names = float_names(rf.dtypes(), rb.dtypes(), include=masking.include, exclude=masking.exclude)
        readers = {
            f"source base {source_base}": rb,
            f"source fine-tune {source_finetuned}": rf,
            f"target base {target_base}": rt,
        }
        check_checkpoints(readers, names, source_finetuned)
        nonzero = scan_task_vector(rb, rf, names)
        if not nonzero:
            raise_zero_task_vector(len(names), source_base, source_finetuned)
        record = _start_record(source_base, source_finetuned, target_base)
        source, recipe, loaded = None, None, None
        combined: SignVotes | None = None
        if masking.mask != "none":
            fresh = []
            record["votes_in"] = [input_record(p) for p in votes_in]
            if data:
                voted, model, recipe, info = vote_on_target(target_base, votes, rt.names(), names, drawn)
                record["data"] = {**input_record(data), **info}
                fresh.append(voted)
                loaded = model if choosing is not None else None  # kept only to choose on
                del model
            validate_votes_files(votes_in, {n: rt.shapes()[n] for n in names})
            if world()[0] != 0:  # under torchrun only the first process writes
                return {**record, "written_by_another_process": True}
            if votes_out or (choosing is not None and choosing.validation is not None):
                collected = [*load_votes(votes_in, rt.shapes()), *fresh]
                combined = sum(collected[1:], collected[0]).with_estimator(votes.estimator)
                del collected
            if votes_out:
                assert combined is not None
                save_votes(combined, votes_out, overwrite)
                if choosing is None or choosing.validation is None:
                    combined = None
            source = VoteSource(fresh, votes_in, votes.estimator)
        plan = MaskPlan(
            mask=masking.mask,
            alpha=float(masking.alpha) if choosing is None else 1.0,
            gamma=masking.gamma,
            threshold=masking.threshold,
            seed=votes.seed,
            unvoted=masking.unvoted,
        )
        record.update(_settings_record(method, votes, masking, bool(data)))
        record["num_samples"] = source.num_samples if source is not None else 0
        try:
            if choosing is not None:
                plan = _choose_plan(
                    choosing, plan, record, votes, (rb, rf, rt), names, nonzero, source, combined,
                    loaded, recipe, drawn,
                )  # fmt: skip
                loaded = combined = None
            with atomic_output_dir(out, overwrite=overwrite) as tmp:
                files, kept, report = stream_transport(
                    rb, rf, rt, names, nonzero, source, plan, tmp, shard_bytes
                )
                record.update(files=files, kept_fraction=kept, descent=report.to_dict() if report else None)
                finish_output(tmp, target_base, record, recipe)
        finally:
            if source is not None:
                source.close()
    return record


def _choose_plan(
    choosing: ChoicePlan,
    plan: MaskPlan,
    record: dict[str, Any],
    votes: VoteSettings,
    readers: tuple[CheckpointReader, CheckpointReader, CheckpointReader],
    names: Sequence[str],
    nonzero: set[str],
    source: VoteSource | None,
    combined: SignVotes | None,
    model: Any,
    recipe: Any,
    drawn: Shots | None,
) -> MaskPlan:
    """Choose ``(t, α)``, record the choice, and return ``plan`` set to write it.

    ``model`` and ``recipe`` are the target's, loaded for the votes (``None`` when the votes all
    come from files: then the target is loaded here, to score the validation file).
    """
    rb, rf, rt = readers
    uncovered = uncovered_tensors(names, nonzero, source)
    if uncovered and plan.unvoted == "error":
        raise unvoted_error(uncovered)  # before the choice, which would stop on them later
    if model is None:  # votes from files only: load the target to score the validation file
        assert choosing.examples is not None
        model, recipe, mapping = load_target(rt.path, votes, label_set(choosing.examples), rt.names(), names)
    else:
        mapping = align_names([n for n, _ in model.named_parameters()], rt.names())
    # the unvoted policy holds for every candidate, naive addition (t > 1) included
    dropped = set(uncovered) if plan.unvoted == "drop" else set()
    tau = {n: rf.get(n).float() - rb.get(n).float() for n in names if n in nonzero and n not in dropped}
    choice = choose(
        choosing,
        tau,
        combined,
        model,
        recipe,
        mapping,
        drawn.drawn if drawn is not None else None,
        votes,
        plan.unvoted,
    )
    del tau
    mask = output_mask(choice.threshold)
    record.update(mask=mask, threshold=choice.threshold, alpha=choice.alpha, choice=choice_record(choice))
    if choosing.validation is not None:
        record["validation"] = {
            **input_record(choosing.validation),
            "num_examples": len(choosing.examples or []),
        }
    return replace(plan, mask=mask, alpha=choice.alpha, threshold=choice.threshold)


def _transport_aligned(
    method: str,
    source_base: str | Path,
    source_finetuned: str | Path,
    target_base: str | Path,
    out: Path,
    votes: VoteSettings,
    masking: MaskSettings,
    overwrite: bool,
    shard_bytes: int,
) -> dict[str, Any]:
    """TransFusion or Theseus: align ``τ_A`` to the target, mask it (votes taken on the target), write."""
    data = votes.data if masking.mask != "none" else None
    inputs = [Path(source_base), Path(source_finetuned), Path(target_base), *([Path(data)] if data else [])]
    check_outputs(out, inputs, overwrite)
    drawn = draw_shots(target_base, votes) if data else None
    if masking.mask != "none" and not data:
        raise ConfigError(f"the {masking.mask!r} mask needs votes: give --data (or use --mask none)")
    tau_a = TaskVector.from_checkpoints(source_base, source_finetuned, masking.include, masking.exclude)
    check_task_vector_nonzero(tau_a, source_base, source_finetuned)
    tau = aligned_task_vector(method, tau_a, source_base, target_base, seed=votes.seed)
    record = _start_record(source_base, source_finetuned, target_base)
    reference, recipe = None, None
    with open_checkpoint(target_base) as rt:
        target_names = rt.names()
    if data:
        reference, _, recipe, info = vote_on_target(target_base, votes, target_names, list(tau), drawn)
        record["data"] = {**input_record(data), **info}
        if world()[0] != 0:
            return {**record, "written_by_another_process": True}
    masked = mask_task_vector(
        tau,
        reference,
        masking.mask,
        gamma=masking.gamma,
        seed=votes.seed,
        unvoted=masking.unvoted,
        threshold=masking.threshold,
    )
    report = descent_report(reference, masked, tau, masking.alpha) if reference is not None else None
    record.update(_settings_record(method, votes, masking, bool(data)))
    record.update(
        num_samples=reference.num_samples if reference is not None else 0,
        kept_fraction={n: float((masked[n] * tau[n] > 0).double().mean()) for n in tau},
        descent=report.to_dict() if report else None,
    )
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        write_model(tmp, target_base, masked, masking.alpha, shard_bytes, record, recipe)
    return record


def _start_record(
    source_base: str | Path, source_finetuned: str | Path, target_base: str | Path
) -> dict[str, Any]:
    """``gradfix.json``'s header and the sha256 of the three checkpoints."""
    record = base_record("transport")
    record["inputs"] = {
        "source_base": input_record(source_base),
        "source_finetuned": input_record(source_finetuned),
        "target_base": input_record(target_base, model_files=True),
    }
    return record


def _settings_record(method: str, votes: VoteSettings, masking: MaskSettings, voted: bool) -> dict[str, Any]:
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
