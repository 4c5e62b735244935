"""PEFT LoRA adapter folders written from an update of a model's tensors.

:func:`plan_adapter` decides, before anything is computed, how each updated tensor of the base
model enters the adapter, as PEFT can load it (``PeftModel.from_pretrained(base, folder)``):

- ``lora``: the 2-d weight of an ``nn.Linear``, ``nn.Embedding`` or ``transformers``' ``Conv1D``
  module, as rank-``r`` factors ``lora_A`` (r × in) and ``lora_B`` (out × r) with
  ``lora_alpha = r`` (PEFT's scaling ``lora_alpha / r`` is then 1). PEFT stores an embedding's
  and a ``Conv1D``'s update transposed (``ΔW = (B @ A)ᵀ``); ``Conv1D`` modules set
  ``fan_in_fan_out``, so they cannot share an adapter with ``nn.Linear`` ones.
- ``full``: any other updated tensor, saved in full with its new value: the bias of a LoRA
  module through PEFT's ``bias="lora_only"`` (``<module>.base_layer.bias``), the tensors of any
  other module (LayerNorm weights, biases, convolutions) through ``modules_to_save`` (only the
  updated tensors are saved; PEFT keeps the module's others as they are).
- ``dropped``: what PEFT cannot hold: tensors of the model's root, tensors of a module that
  also contains LoRA or saved modules, tensors that are no parameter of the model class.

:class:`AdapterWriter` streams the tensors into ``adapter_model.safetensors`` through the one
safetensors writer (:class:`~gradfix.io.streaming.StreamingSafetensorsFile`) and writes
``adapter_config.json``. The file names and PEFT's tensor names are those the reader
(:mod:`gradfix.io.adapters`) reads back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from gradfix.errors import ConfigError, OutputError
from gradfix.io.adapters import CONFIG_NAME, WEIGHTS_NAME, lora_names, saved_name
from gradfix.io.paths import os_reason
from gradfix.io.streaming import StreamingSafetensorsFile, TensorPlan

LORA_KINDS = ("linear", "embedding", "conv1d")
"""Module kinds whose 2-d weight becomes LoRA factors."""
Form = Literal["lora", "full", "dropped"]
_LISTED = 5


@dataclass(frozen=True)
class ModuleParam:
    """Where a checkpoint tensor lives in the model: its module (as the model names it), its
    parameter name in that module, and the module's kind (one of :data:`LORA_KINDS` or ``other``)."""

    module: str
    param: str
    kind: str


@dataclass(frozen=True)
class AdapterEntry:
    """How one updated tensor of the base enters the adapter."""

    name: str
    form: Form
    shape: tuple[int, ...]
    dtype: torch.dtype
    keys: tuple[str, ...] = ()
    """The adapter file's names: ``(lora_A, lora_B)`` for ``lora``, one name for ``full``."""
    transposed: bool = False
    """Whether PEFT stores the update transposed (embeddings, ``Conv1D``): factor ``ΔWᵀ``."""
    reason: str = ""
    """Why a ``dropped`` tensor could not be held."""


@dataclass
class AdapterLayout:
    """Every updated tensor's entry, in file order, and the adapter's PEFT settings."""

    rank: int
    entries: list[AdapterEntry]
    target_modules: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    bias: str = "none"
    fan_in_fan_out: bool = False

    def plan(self) -> list[TensorPlan]:
        """The tensors of ``adapter_model.safetensors``: LoRA factors in float32, full tensors in
        the base's dtype."""
        plans = []
        for e in self.entries:
            if e.form == "lora":
                rows, cols = (e.shape[1], e.shape[0]) if e.transposed else e.shape
                plans.append(TensorPlan(e.keys[0], torch.float32, (self.rank, cols)))
                plans.append(TensorPlan(e.keys[1], torch.float32, (rows, self.rank)))
            elif e.form == "full":
                plans.append(TensorPlan(e.keys[0], e.dtype, e.shape))
        return plans

    def config(self, base_model: str, task_type: str | None) -> dict[str, Any]:
        """``adapter_config.json``: a LoRA of rank ``r`` with scaling 1 (``lora_alpha = r``)."""
        return {
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": base_model,
            "r": self.rank,
            "lora_alpha": self.rank,
            "use_rslora": False,
            "use_dora": False,
            "lora_dropout": 0.0,
            "fan_in_fan_out": self.fan_in_fan_out,
            "bias": self.bias,
            "target_modules": self.target_modules,
            "modules_to_save": self.modules_to_save or None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "init_lora_weights": True,
            "inference_mode": True,
            "revision": None,
        }


def _inside(module: str, parent: str) -> bool:
    """Whether ``module`` lies strictly inside ``parent`` (the root ``""`` holds every module)."""
    return module != parent and (parent == "" or module.startswith(parent + "."))


def _check_rank(rank: int, too_small: Sequence[tuple[str, str, tuple[int, ...]]]) -> None:
    """Refuse a rank below 1, or above ``min(out, in)`` of the ``(module, tensor, shape)`` given."""
    if rank < 1:
        raise ConfigError(f"--adapter-rank must be a positive integer, got {rank}")
    if too_small:
        listed = ", ".join(f"{m} ({s[0]}×{s[1]}: at most {min(s)})" for m, _, s in too_small[:_LISTED])
        more = f" and {len(too_small) - _LISTED} more" if len(too_small) > _LISTED else ""
        raise ConfigError(
            f"--adapter-rank {rank} is larger than {len(too_small)} module(s) allow: {listed}{more}; "
            f"lower the rank or leave them out (e.g. --exclude {too_small[0][1]})"
        )


def plan_adapter(
    names: Sequence[str],
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, torch.dtype],
    owners: Mapping[str, ModuleParam],
    rank: int,
) -> AdapterLayout:
    """The layout of a rank-``rank`` adapter of the updated tensors ``names`` (in file order).

    ``owners`` places each tensor in the model (a tensor it lacks is dropped). A ``rank`` larger
    than a LoRA module's ``min(out, in)`` is a :class:`~gradfix.errors.ConfigError` naming the
    modules, and so is an adapter mixing ``nn.Linear`` and ``Conv1D`` modules.
    """
    lora = {owners[n].module: n for n in names if _is_lora(n, shapes, owners)}
    _check_rank(rank, [(m, n, tuple(shapes[n])) for m, n in lora.items() if rank > min(shapes[n])])
    kinds = {owners[n].kind for n in lora.values()}
    if {"linear", "conv1d"} <= kinds:
        raise ConfigError(
            "an adapter cannot hold both nn.Linear and Conv1D modules (PEFT's fan_in_fan_out holds "
            "for all); leave one kind out with --exclude"
        )
    saved = {
        owners[n].module
        for n in names
        if n in owners and owners[n].module not in lora and not _is_lora(n, shapes, owners)
    }
    holders = set(lora) | saved
    entries, bias_used = [], False
    for n in names:
        shape, dtype, owner = tuple(shapes[n]), dtypes[n], owners.get(n)
        if owner is None:
            entries.append(AdapterEntry(n, "dropped", shape, dtype, reason="no parameter of the model"))
        elif owner.module in lora and _is_lora(n, shapes, owners):
            keys = lora_names(owner.module, embedding=owner.kind == "embedding")
            entries.append(AdapterEntry(n, "lora", shape, dtype, keys, transposed=owner.kind != "linear"))
        elif owner.module in lora and owner.param == "bias":
            bias_used = True
            entries.append(AdapterEntry(n, "full", shape, dtype, (saved_name(owner.module, "bias", True),)))
        elif owner.module in lora:
            reason = "in a LoRA module, not its weight"
            entries.append(AdapterEntry(n, "dropped", shape, dtype, reason=reason))
        elif owner.module == "" or any(_inside(h, owner.module) for h in holders):
            reason = "of the model's root" if owner.module == "" else "its module holds adapted modules"
            saved.discard(owner.module)
            entries.append(AdapterEntry(n, "dropped", shape, dtype, reason=reason))
        else:
            entries.append(AdapterEntry(n, "full", shape, dtype, (saved_name(owner.module, owner.param),)))
    return AdapterLayout(
        rank,
        entries,
        target_modules=list(lora),
        modules_to_save=sorted(saved),
        bias="lora_only" if bias_used else "none",
        fan_in_fan_out="conv1d" in kinds,
    )


def _is_lora(name: str, shapes: Mapping[str, tuple[int, ...]], owners: Mapping[str, ModuleParam]) -> bool:
    owner = owners.get(name)
    return (
        owner is not None
        and owner.kind in LORA_KINDS
        and owner.param == "weight"
        and len(shapes[name]) == 2
        and owner.module != ""
    )


class AdapterWriter:
    """``adapter_model.safetensors`` streamed in the layout's order, then ``adapter_config.json``.

    Call :meth:`write` with each planned tensor (whole or in row chunks) in
    :meth:`AdapterLayout.plan` order, then :meth:`close`; on failure :meth:`abort` and discard the
    folder. A failed write is an :class:`~gradfix.errors.OutputError`.
    """

    def __init__(self, folder: str | Path, layout: AdapterLayout, metadata: Mapping[str, str] | None = None):
        """Create the weight file in the existing ``folder`` and write its header."""
        self.folder, self.layout = Path(folder), layout
        try:
            self._file = StreamingSafetensorsFile(self.folder / WEIGHTS_NAME, layout.plan(), metadata)
        except OSError as exc:
            raise OutputError(f"cannot write {WEIGHTS_NAME} ({os_reason(exc)})") from exc

    def write(self, key: str, data: torch.Tensor) -> None:
        """Append (rows of) the adapter tensor ``key`` in its planned dtype."""
        try:
            self._file.write(key, data)
        except OSError as exc:
            raise OutputError(f"cannot write {WEIGHTS_NAME} ({os_reason(exc)})") from exc

    def close(self, base_model: str, task_type: str | None) -> list[str]:
        """Finish the weights and write ``adapter_config.json``; returns the two file names."""
        text = json.dumps(self.layout.config(base_model, task_type), indent=2, sort_keys=True) + "\n"
        try:
            self._file.close()
            (self.folder / CONFIG_NAME).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"cannot finish the adapter files ({os_reason(exc)})") from exc
        return [CONFIG_NAME, WEIGHTS_NAME]

    def abort(self) -> None:
        """Close the weight file without checking (the caller discards the folder)."""
        self._file.abort()


__all__ = ["LORA_KINDS", "AdapterEntry", "AdapterLayout", "AdapterWriter", "ModuleParam", "plan_adapter"]
