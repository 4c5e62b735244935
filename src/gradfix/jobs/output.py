"""The one output loop of every job: ``θ_target + α · update`` written tensor by tensor, in slices.

Transport (a masked ``τ_A`` streamed from checkpoints), the aligned methods and merge (updates
computed in memory, one tensor at a time) all write through :func:`write_model`: each target
tensor is read in row slices, checked for NaN/Inf, added to its update in float32, checked for
values that overflow the target's dtype, and streamed to the sharded writer; the target's other
files, ``gradfix.json``, ``gradfix.yaml`` and the model card follow (:func:`finish_output`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from gradfix.checks import FiniteCheck, count_nonfinite
from gradfix.diagnostics import DescentReport
from gradfix.errors import NonFiniteError, OutputError
from gradfix.io import CheckpointReader, copy_model_files, sort_safetensors_metadata
from gradfix.io.checkpoint import row_slices
from gradfix.io.streaming import StreamingShardedWriter, TensorPlan
from gradfix.io.writer import WRITE_ERRORS
from gradfix.jobs.card import CARD_FILE, model_card
from gradfix.jobs.inputs import HEAD_FILE
from gradfix.jobs.replay import REPLAY_FILE, replay_yaml
from gradfix.masking import Reference, TauRows, TensorTally, masked_rows
from gradfix.ops.masks import Mask, MaskOptions
from gradfix.task_vector import apply_tensor


class Update(Protocol):
    """The update of some target tensors, given slice by slice."""

    def __contains__(self, name: object) -> bool:
        """Whether tensor ``name`` is updated."""

    def slices(self, name: str, shape: tuple[int, ...]) -> Iterator[tuple[int, int, Tensor]]:
        """``(start, stop, update rows)`` covering tensor ``name``."""


class WholeUpdate:
    """An update given as whole tensors (a mapping that may compute each tensor when read)."""

    def __init__(self, tensors: Mapping[str, Tensor]):
        self.tensors = tensors

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def slices(self, name: str, shape: tuple[int, ...]) -> Iterator[tuple[int, int, Tensor]]:
        """The whole tensor as one slice."""
        yield 0, (shape[0] if shape else 1), self.tensors[name]


class MaskedUpdate:
    """``mask(τ_A)`` streamed from the source checkpoints, tallied for the record as it goes."""

    def __init__(
        self,
        tau: TauRows,
        names: Sequence[str],
        reference: Reference | None,
        mask: Mask,
        options: MaskOptions,
        keep_unvoted: bool,
        alpha: float,
    ):
        self.tau, self.names, self.reference = tau, set(names), reference
        self.mask, self.options, self.keep_unvoted, self.alpha = mask, options, keep_unvoted, alpha
        self.tallies: list[TensorTally] = []

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def slices(self, name: str, shape: tuple[int, ...]) -> Iterator[tuple[int, int, Tensor]]:
        """The masked rows of ``name``, each counted in the tensor's tally."""
        tally = TensorTally(name, self.alpha)
        self.tallies.append(tally)
        for rows in masked_rows(
            name, shape, self.tau, self.reference, self.mask, self.options, self.keep_unvoted
        ):
            tally.add(rows)
            yield rows.start, rows.stop, rows.update

    def kept_fraction(self) -> dict[str, float]:
        """Per tensor, the share of ``τ_A``'s non-zero coordinates kept with their sign."""
        return {t.name: t.descent().kept_fraction for t in self.tallies}

    def report(self) -> DescentReport | None:
        """The first-order descent report (``None`` without votes, or for ``none``)."""
        if self.reference is None or not self.mask.needs_reference:
            return None
        return DescentReport([t.descent() for t in self.tallies], self.alpha)


def write_model(
    out: Path, target: CheckpointReader, update: Update, alpha: float, shard_bytes: int
) -> list[str]:
    """Write ``θ_target + α · update`` for every tensor of the target; returns the files written.

    Tensors keep the target's dtype (the sum is computed in float32). Every target tensor is
    checked for NaN/Inf as it is read and every updated tensor for values that overflow its dtype
    (e.g. float16); one error names every tensor at fault, and once one is found nothing more is
    written (the caller's temporary folder is then discarded).
    """
    dtypes, shapes = target.dtypes(), target.shapes()
    plan = [TensorPlan(n, dtypes[n], shapes[n]) for n in target.names()]
    writer = StreamingShardedWriter(out, plan, shard_bytes, {"gradfix": "transported"})
    finite, overflow = FiniteCheck(), []
    try:
        for name in target.names():
            shape = tuple(shapes[name])
            if name in update:
                parts: Iterator[tuple[int, int, Tensor | None]] = update.slices(name, shape)
            else:
                parts = ((start, stop, None) for start, stop in row_slices(shape))
            for start, stop, rows in parts:
                theta = target.rows(name, start, stop)
                if not finite.check(target.file_of(name), name, theta) or finite:
                    continue  # once an input is bad: keep scanning, stop writing
                value = theta if rows is None else apply_tensor(theta, rows, alpha)
                if rows is not None and count_nonfinite(value):
                    overflow.append(f"{name!r} ({theta.dtype})")
                if not overflow:
                    writer.write(name, value)
        finite.raise_if_any()
        raise_if_overflow(target.path, alpha, overflow)
        return [p.name for p in writer.close()]
    except BaseException:
        writer.abort()
        raise


def raise_if_overflow(target: str | Path, alpha: float, overflow: Sequence[str]) -> None:
    """One error naming the tensors where ``θ + α·τ`` overflowed the target's dtype (none: no-op)."""
    bad = list(dict.fromkeys(overflow))
    if bad:
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise NonFiniteError(
            f"{target}: θ + α·τ with α = {alpha:g} overflows the dtype of {len(bad)} tensor(s): "
            f"{', '.join(bad[:10])}{more}; lower --alpha or convert the target to float32"
        )


def finish_output(
    out: Path, target: str | Path, record: dict[str, Any], recipe: Any = None, model_files: bool = True
) -> list[str]:
    """Copy the target's config and tokenizer files (unless ``model_files`` is false: an adapter
    output), save the zero-shot head, write the record,
    ``gradfix.yaml`` and the model card.

    The target's own model card (``README.md``) describes the target, so it is not copied: the
    output gets its own (:func:`gradfix.jobs.card.model_card`), written from the record with
    ``gradfix.json``, and ``gradfix.yaml`` when the record holds the job's options
    (:mod:`gradfix.jobs.replay`). ``record["files"]`` (the weight files) gains the head file;
    returns that list.
    """
    if model_files:
        copy_model_files(target, out, skip=(CARD_FILE,))
    files = list(record.get("files", []))
    try:
        if recipe is not None and hasattr(recipe, "save_head"):
            recipe.save_head(out / HEAD_FILE)
            sort_safetensors_metadata(out / HEAD_FILE)
            files.append(HEAD_FILE)
        record["files"] = files
        text = json.dumps(record, indent=2, sort_keys=True) + "\n"
        (out / "gradfix.json").write_text(text, encoding="utf-8")
        if "options" in record:
            options = replay_yaml(str(record.get("command")), record["options"])
            (out / REPLAY_FILE).write_text(options, encoding="utf-8")
        (out / CARD_FILE).write_text(model_card(record), encoding="utf-8")
    except WRITE_ERRORS as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise OutputError(f"cannot write {HEAD_FILE}, gradfix.json or the model card ({reason})") from exc
    return files
