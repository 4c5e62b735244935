"""The transported update written as a PEFT LoRA adapter for the target (``--out-format adapter``).

Instead of ``θ_B + α · m ⊙ τ_A`` in full, the output folder holds ``adapter_config.json`` and
``adapter_model.safetensors``: per updated weight of a Linear, Embedding or ``Conv1D`` module
the rank-``r`` truncated SVD of ``ΔW = α · m ⊙ τ_A`` (:func:`gradfix.ops.lowrank.truncated_svd`),
the other updated tensors in full (see :mod:`gradfix.io.adapter_writer` for what goes where).
:func:`prepare_adapter` plans the adapter from the target's model class (built on the meta
device, no weights read) before any long work; :func:`write_adapter` streams the update tensor by
tensor: each LoRA weight is gathered whole, factored and written, so memory holds one tensor.
``gradfix.json`` records, per tensor, the share of the update's energy (squared Frobenius norm)
the adapter keeps, and the total.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradfix.checks import FiniteCheck, count_nonfinite
from gradfix.errors import ConfigError
from gradfix.io import CheckpointReader
from gradfix.io.adapter_writer import AdapterEntry, AdapterLayout, AdapterWriter, ModuleParam, plan_adapter
from gradfix.jobs.common import align_names
from gradfix.jobs.output import MaskedUpdate, raise_if_overflow
from gradfix.ops.lowrank import truncated_svd
from gradfix.recipes._hf import require_transformers
from gradfix.task_vector import apply_tensor

OUT_FORMATS = ("full", "adapter")
# PEFT's task types by the suffix of the model class (``BertForSequenceClassification``, ...)
_TASK_TYPES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)


@dataclass(frozen=True)
class AdapterOutput:
    """A planned adapter output: its layout, the base it names and PEFT's task type."""

    layout: AdapterLayout
    base_model: str
    task_type: str | None


def check_out_format(out_format: str, adapter_rank: int | None, method: str, aligns: bool = False) -> bool:
    """Check the output format settings; returns whether the output is an adapter.

    ``--adapter-rank`` needs ``--out-format adapter`` and the reverse; methods that rewrite the
    target itself (``aligns``: TransFusion, Theseus) cannot be written as an adapter.
    """
    if out_format not in OUT_FORMATS:
        raise ConfigError(f"--out-format must be one of {', '.join(OUT_FORMATS)}, got {out_format!r}")
    if out_format == "full":
        if adapter_rank is not None:
            raise ConfigError("--adapter-rank needs --out-format adapter")
        return False
    if adapter_rank is None:
        raise ConfigError("--out-format adapter needs --adapter-rank R")
    if isinstance(adapter_rank, bool) or not isinstance(adapter_rank, int) or adapter_rank < 1:
        raise ConfigError(f"--adapter-rank must be a positive integer, got {adapter_rank!r}")
    if aligns:
        raise ConfigError(
            f"--method {method} permutes the target's own weights, which an adapter cannot hold; "
            "use --out-format full"
        )
    return True


def _kind(module: nn.Module, conv1d: type | None) -> str:
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "linear"
    return "conv1d" if conv1d is not None and isinstance(module, conv1d) else "other"


def model_owners(folder: Path, checkpoint_names: list[str]) -> tuple[dict[str, ModuleParam], str | None]:
    """Each checkpoint tensor's module, parameter and module kind in the folder's model class (the
    first of ``config.json``'s ``architectures``, else ``AutoModel``), and PEFT's task type."""
    transformers = require_transformers()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder}: --out-format adapter needs the target as a folder with config.json")
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    arch = (getattr(config, "architectures", None) or [""])[0]
    cls = getattr(transformers, arch, None)
    try:
        with torch.device("meta"):
            model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    except Exception as exc:  # a model class that cannot be built: name it, no traceback
        raise ConfigError(f"{folder}: cannot build its model class {arch or 'AutoModel'} ({exc})") from exc
    conv1d = getattr(getattr(transformers, "pytorch_utils", None), "Conv1D", None)
    modules = dict(model.named_modules(remove_duplicate=False))
    params = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    owners = {}
    for model_name, ckpt_name in align_names(params, checkpoint_names).items():
        module, _, param = model_name.rpartition(".")
        owners[ckpt_name] = ModuleParam(module, param, _kind(modules[module], conv1d))
    task = next((t for suffix, t in _TASK_TYPES if type(model).__name__.endswith(suffix)), None)
    if task is None and type(model).__name__.endswith("Model"):
        task = "FEATURE_EXTRACTION"
    return owners, task


def prepare_adapter(
    target_base: str | Path, target: CheckpointReader, names: list[str], rank: int
) -> AdapterOutput:
    """Plan the rank-``rank`` adapter of the updated tensors ``names`` of ``target`` (before any
    long work: a rank too large for a module is refused here). ``target_base`` is written, as given,
    as the adapter's ``base_model_name_or_path``."""
    path = Path(target.path)
    folder = path if path.is_dir() else path.parent
    owners, task = model_owners(folder, target.names())
    wanted = set(names)
    ordered = [n for n in target.names() if n in wanted]
    layout = plan_adapter(ordered, target.shapes(), target.dtypes(), owners, rank)
    return AdapterOutput(layout, str(target_base), task)


def _gather(update: MaskedUpdate, name: str, shape: tuple[int, ...], alpha: float) -> Tensor:
    """``α · mask(τ_A)`` of tensor ``name`` whole, in float32."""
    parts = [rows.float() for _, _, rows in update.slices(name, shape)]
    return (alpha * torch.cat(parts)).reshape(shape) if parts else torch.zeros(shape)


def _write_entry(
    writer: AdapterWriter, entry: AdapterEntry, target: CheckpointReader, update: MaskedUpdate, alpha: float,
    checks: tuple[FiniteCheck, list[str]],
) -> tuple[float, float]:  # fmt: skip
    """Write one tensor's part of the adapter; returns ``(energy, kept energy)`` of its update."""
    finite, overflow = checks
    shape = entry.shape
    if entry.form == "lora":
        delta = _gather(update, entry.name, shape, alpha)
        if not finite.check("the transported update", entry.name, delta):
            return 0.0, 0.0
        low = truncated_svd(delta.T if entry.transposed else delta, writer.layout.rank)
        if not finite:
            writer.write(entry.keys[0], low.a)
            writer.write(entry.keys[1], low.b)
        return low.energy, low.kept
    energy = 0.0
    for start, stop, rows in update.slices(entry.name, shape):
        energy += alpha**2 * float(torch.linalg.vector_norm(rows.float(), dtype=torch.float64) ** 2)
        if entry.form == "dropped":
            continue
        theta = target.rows(entry.name, start, stop)
        if not finite.check(target.file_of(entry.name), entry.name, theta) or finite:
            continue
        value = apply_tensor(theta, rows, alpha)
        if count_nonfinite(value):
            overflow.append(f"{entry.name!r} ({theta.dtype})")
        if not overflow:
            writer.write(entry.keys[0], value)
    return energy, (0.0 if entry.form == "dropped" else energy)


def write_adapter(
    out: Path, target: CheckpointReader, update: MaskedUpdate, alpha: float, adapter: AdapterOutput
) -> dict[str, Any]:
    """Write the adapter of ``α · update`` into the folder ``out``; returns its ``gradfix.json``
    record (``files``, and ``adapter``: settings, per-tensor form and kept energy share, total).

    The update's other tensors (those ``τ_A`` leaves at zero) are streamed too, so the update's
    tallies (kept fraction, descent report) are those of a full output.
    """
    layout = adapter.layout
    entries = {e.name: e for e in layout.entries}
    writer = AdapterWriter(out, layout, {"gradfix": "transported"})
    finite, overflow = FiniteCheck(), list[str]()
    tensors: dict[str, dict[str, Any]] = {}
    try:
        for name in target.names():
            if name not in update:
                continue
            entry = entries.get(name)
            if entry is None:  # τ_A is zero there: tallied, nothing to write
                for _ in update.slices(name, tuple(target.shapes()[name])):
                    pass
                continue
            energy, kept = _write_entry(writer, entry, target, update, alpha, (finite, overflow))
            tensors[name] = _tensor_record(entry, energy, kept)
        finite.raise_if_any()
        raise_if_overflow(target.path, alpha, overflow)
        files = writer.close(adapter.base_model, adapter.task_type)
    except BaseException:
        writer.abort()
        raise
    return {"files": files, "adapter": _adapter_record(adapter, tensors)}


def _tensor_record(entry: AdapterEntry, energy: float, kept: float) -> dict[str, Any]:
    share = 1.0 if energy <= 0 else min(1.0, kept / energy)
    record: dict[str, Any] = {"form": entry.form, "energy": energy, "kept_share": share}
    if entry.reason:
        record["reason"] = entry.reason
    return record


def _adapter_record(adapter: AdapterOutput, tensors: dict[str, dict[str, Any]]) -> dict[str, Any]:
    layout = adapter.layout
    energy = sum(t["energy"] for t in tensors.values())
    kept = sum(t["energy"] * t["kept_share"] for t in tensors.values())
    return {
        "format": "peft-lora",
        "rank": layout.rank,
        "base_model_name_or_path": adapter.base_model,
        "task_type": adapter.task_type,
        "target_modules": layout.target_modules,
        "modules_to_save": layout.modules_to_save,
        "bias": layout.bias,
        "fan_in_fan_out": layout.fan_in_fan_out,
        "tensors": tensors,
        "dropped": [n for n, t in tensors.items() if t["form"] == "dropped"],
        "energy": energy,
        "kept_share": 1.0 if energy <= 0 else min(1.0, kept / energy),
    }


__all__ = [
    "OUT_FORMATS",
    "AdapterOutput",
    "check_out_format",
    "model_owners",
    "prepare_adapter",
    "write_adapter",
]
