"""The aligned transports (TransFusion, Theseus): align ``τ_A`` to the target, mask it, write."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradfix.diagnostics import descent_report
from gradfix.errors import ConfigError
from gradfix.io import atomic_output_dir, open_checkpoint
from gradfix.io.adapters import is_adapter_folder
from gradfix.jobs.aligned_activations import align_on_shots, check_same_family
from gradfix.jobs.check_votes import aligned_verdict
from gradfix.jobs.common import draw_shots, vote_on_target
from gradfix.jobs.inputs import check_outputs, check_task_vector_nonzero, data_record
from gradfix.jobs.output import WholeUpdate, finish_output, write_model
from gradfix.jobs.transport_record import settings_record, start_record
from gradfix.masking import mask_task_vector
from gradfix.methods import fixed_alpha
from gradfix.methods.aligned import AlignedMethod
from gradfix.ops.masks import get_mask
from gradfix.settings import MaskSettings, VoteSettings
from gradfix.task_vector import TaskVector
from gradfix.votes.distributed import world


def transport_aligned(
    method: AlignedMethod,
    source_base: str | Path,
    source_finetuned: str | Path,
    target_base: str | Path,
    out: Path,
    votes: VoteSettings,
    masking: MaskSettings,
    overwrite: bool,
    shard_bytes: int,
    options: dict[str, Any],
) -> dict[str, Any]:
    """TransFusion or Theseus: align ``τ_A`` to the target, mask it (votes taken on the target), write.

    Theseus with ``votes.data`` maps from A's and B's activations on the drawn shots
    (:func:`gradfix.jobs.aligned_activations.align_on_shots`), else from the weights; the record
    says which under the method's name."""
    needs_votes = get_mask(str(masking.mask)).needs_reference
    from_data = bool(votes.data) and method.uses_activations
    data = votes.data if needs_votes or from_data else None
    inputs = [Path(source_base), Path(source_finetuned), Path(target_base), *([Path(data)] if data else [])]
    check_outputs(out, inputs, overwrite)
    check_same_family(method.name, source_base, target_base)
    drawn = draw_shots(target_base, votes) if data else None
    if needs_votes and not data:
        raise ConfigError(f"the {masking.mask!r} mask needs votes: give --data (or use --mask none)")
    read = TaskVector.from_adapter if is_adapter_folder(source_finetuned) else TaskVector.from_checkpoints
    tau_a = read(source_base, source_finetuned, masking.include, masking.exclude)
    check_task_vector_nonzero(tau_a, source_base, source_finetuned)
    record = start_record(source_base, source_finetuned, target_base, options)
    alignment: dict[str, Any] | None
    if from_data and drawn is not None:
        tau, alignment = align_on_shots(method, tau_a, (source_base, target_base), votes, drawn)
    else:
        tau = method.align(tau_a, source_base, target_base, seed=votes.seed)
        alignment = method.weights_record()
    if alignment is not None:
        record[method.name] = alignment
    reference, recipe = None, None
    with open_checkpoint(target_base) as rt:
        target_names = rt.names()
    if needs_votes:
        reference, _, recipe, info = vote_on_target(target_base, votes, target_names, list(tau), drawn)
        record["data"] = {**data_record(str(data)), **info}
        if world()[0] != 0:
            return {**record, "written_by_another_process": True}
        record["check"] = aligned_verdict(tau, reference, method.name, votes.seed)
    alpha = fixed_alpha(masking.alpha)
    masked = mask_task_vector(
        tau,
        reference,
        str(masking.mask),
        gamma=masking.gamma,
        seed=votes.seed,
        unvoted=masking.unvoted,
        threshold=float(masking.threshold or 0.0),
    )
    report = descent_report(reference if reference is not None else {}, masked, tau, alpha)
    record.update(settings_record(method.name, votes, masking, bool(data)))
    record.update(
        num_samples=reference.num_samples if reference is not None else 0,
        kept_fraction={t.name: t.kept_fraction for t in report.tensors},
        descent=report.to_dict() if reference is not None else None,
    )
    with atomic_output_dir(out, overwrite=overwrite) as tmp, open_checkpoint(target_base) as rt:
        record["files"] = write_model(tmp, rt, WholeUpdate(masked), alpha, shard_bytes)
        finish_output(tmp, target_base, record, recipe)
    return record
