"""PEFT LoRA adapter folders read as task vectors over the base model's tensor names.

A folder holding ``adapter_config.json`` and ``adapter_model.safetensors`` (as written by
``PeftModel.save_pretrained``) describes, for each adapted module, ``ΔW = s · B @ A`` with
``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), ``r`` and ``lora_alpha``
overridden per module by ``rank_pattern`` / ``alpha_pattern``. Tensors saved in full
(``modules_to_save``, trained biases, ``<module>.base_layer.bias`` of ``bias="lora_only"``) replace
the base tensor, so their task vector is ``saved − base``. The names PEFT gives these tensors
(:func:`lora_names`, :func:`saved_name`) are shared with the writer
(:mod:`gradfix.io.adapter_writer`). :func:`open_adapter` reads the folder lazily;
:meth:`LoraAdapter.rows` computes any rows of one ``ΔW`` on demand, so a large model's task vector
is never held all at once.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from torch import Tensor

from gradfix.errors import CheckpointError, ConfigError, MismatchError
from gradfix.io.checkpoint import CheckpointReader, open_checkpoint

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
"""The prefix of every tensor name in a PEFT adapter file (``PeftModel`` wraps the model twice)."""
# config entries naming LoRA variants whose ΔW is not ``s · B @ A``: refused when set
_UNSUPPORTED = (
    "use_dora",
    "use_qalora",
    "lora_bias",
    "target_parameters",
    "layer_replication",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_bdlora",
    "kasa_config",
    "velora_config",
    "monteclora_config",
)
# ``<module>.lora_A.weight``, ``<module>.lora_A.<adapter>.weight``, ``<module>.lora_embedding_A``
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>embedding_)?(?P<ab>[AB])(?:\.[^.]+)*$")
# ``<module>.modules_to_save[.<adapter>].<param>``, ``<module>.base_layer.bias`` (``bias="lora_only"``)
_SAVED = re.compile(r"\.(?:modules_to_save(?:\.[^.]+)?|base_layer)(?=\.[^.]+$)")


def lora_names(module: str, embedding: bool = False) -> tuple[str, str]:
    """PEFT's file names of ``A`` and ``B`` of LoRA module ``module`` (as ``save_pretrained`` writes
    them): ``base_model.model.<module>.lora_A.weight`` or, for an embedding, ``...lora_embedding_A``."""
    if embedding:
        return f"{PEFT_PREFIX}{module}.lora_embedding_A", f"{PEFT_PREFIX}{module}.lora_embedding_B"
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def saved_name(module: str, param: str, lora_module: bool = False) -> str:
    """PEFT's file name of tensor ``param`` of ``module`` saved in full:
    ``base_model.model.<module>.<param>``, or ``...<module>.base_layer.<param>`` for the bias of a
    LoRA module (``bias="lora_only"``)."""
    inner = f"{module}.base_layer" if lora_module else module
    return f"{PEFT_PREFIX}{inner}.{param}"


class RowSource(Protocol):
    """Anything that reads row ranges of named tensors, e.g. a :class:`CheckpointReader`."""

    def rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of tensor ``name``."""
        ...


def is_adapter_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a PEFT ``adapter_config.json``."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """The first pattern key matching ``module`` as PEFT matches them, or ``None``.

    PEFT (``peft.utils.other.get_pattern_key``) takes a key as a regular expression that must
    match the whole module name or a dot-separated tail of it.
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass(frozen=True)
class _Lora:
    a: str  # tensor name of A in the adapter file
    b: str  # tensor name of B
    scale: float
    transpose: bool  # ΔW = s · (B @ A)ᵀ (fan_in_fan_out layers, embeddings)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a PEFT adapter folder (no {CONFIG_NAME})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable adapter config ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: adapter config is not a JSON object")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise ConfigError(f"{path}: unsupported adapter type {kind!r}; only LORA adapters can be read")
    for key in _UNSUPPORTED:
        if config.get(key):
            raise ConfigError(f"{path}: unsupported LORA variant {key}={config[key]!r}")
    return config


def _scale(config: Mapping[str, Any], module: str, where: Path) -> float:
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r_key, alpha_key = pattern_key(rank_pattern, module), pattern_key(alpha_pattern, module)
    r = rank_pattern[r_key] if r_key is not None else config.get("r")
    alpha = alpha_pattern[alpha_key] if alpha_key is not None else config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise CheckpointError(f"{where}: invalid LoRA rank {r!r} for module {module}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise CheckpointError(f"{where}: invalid lora_alpha {alpha!r} for module {module}")
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)


class _NameMap:
    """Maps adapter-side parameter names onto base names, tolerating a differing model prefix."""

    def __init__(self, base_names: Sequence[str]) -> None:
        self._names = set(base_names)
        self._by_tail: dict[str, list[str]] = {}
        for name in base_names:
            parts = name.split(".")
            for k in range(1, len(parts)):
                self._by_tail.setdefault(".".join(parts[k:]), []).append(name)

    def resolve(self, name: str, where: Path) -> str:
        parts = name.split(".")
        for k in range(0, len(parts) - 1):  # drop adapter-side prefix components one by one
            tail = ".".join(parts[k:])
            found = [tail] if tail in self._names else self._by_tail.get(tail, [])
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise CheckpointError(
                    f"{where}: adapter tensor {name} matches several base tensors; "
                    f"e.g. {', '.join(sorted(found)[:3])}"
                )
        raise CheckpointError(f"{where}: adapter module {name} matches no tensor of the base model")


class LoraAdapter:
    """A LoRA adapter seen as a task vector over base tensor names (see :func:`open_adapter`)."""

    def __init__(
        self,
        path: str | Path,
        base_names: Sequence[str],
        base_shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> None:
        self.path = Path(path)
        self.config = _read_config(self.path)
        weights = self.path / WEIGHTS_NAME
        if not weights.is_file():
            if (self.path / "adapter_model.bin").is_file():
                raise CheckpointError(
                    f"{self.path}: adapter_model.bin is not supported; save it as safetensors"
                )
            raise CheckpointError(f"{self.path}: adapter folder has no {WEIGHTS_NAME}")
        self._reader: CheckpointReader = open_checkpoint(weights)
        try:
            self._lora: dict[str, _Lora] = {}
            self._full: dict[str, str] = {}  # base name -> adapter tensor saved in full
            self._shapes: dict[str, tuple[int, ...]] = {}
            self._index(_NameMap(base_names), base_shapes or {})
        except BaseException:
            self._reader.close()
            raise

    def _index(self, names: _NameMap, base_shapes: Mapping[str, tuple[int, ...]]) -> None:
        where, shapes = self.path / WEIGHTS_NAME, self._reader.shapes()
        pairs: dict[str, dict[str, str]] = {}
        embedding: set[str] = set()
        for tensor in self._reader.names():
            inner = tensor[len(PEFT_PREFIX) :] if tensor.startswith(PEFT_PREFIX) else tensor
            m = _LORA.match(inner)
            if m:
                pairs.setdefault(m["module"], {})[m["ab"]] = tensor
                if m["kind"]:
                    embedding.add(m["module"])
                continue
            base = names.resolve(_SAVED.sub("", inner), where)
            self._full[base] = tensor
            self._shapes[base] = shapes[tensor]
        fan_in_fan_out = bool(self.config.get("fan_in_fan_out"))
        for module, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise CheckpointError(f"{where}: module {module} has lora_{''.join(ab)} but not both A and B")
            a, b = shapes[ab["A"]], shapes[ab["B"]]
            if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
                raise CheckpointError(
                    f"{where}: module {module} has LoRA shapes A{list(a)} B{list(b)}; "
                    "expected 2-d (r, in) and (out, r)"
                )
            transpose = module in embedding or fan_in_fan_out
            base = names.resolve(f"{module}.weight", where)
            if base in self._full:
                raise CheckpointError(f"{where}: {base} is both LoRA-adapted and saved in full")
            lora = _Lora(ab["A"], ab["B"], _scale(self.config, module, self.path / CONFIG_NAME), transpose)
            self._lora[base] = lora
            self._shapes[base] = (a[1], b[0]) if transpose else (b[0], a[1])
        for name, shape in self._shapes.items():
            if name in base_shapes and tuple(base_shapes[name]) != shape:
                raise MismatchError(
                    f"{self.path}: adapter gives {name} shape {list(shape)}, "
                    f"base has {list(base_shapes[name])}"
                )

    def names(self) -> list[str]:
        """Base tensor names the adapter changes (LoRA-adapted weights and tensors saved in full)."""
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of ``ΔW`` for base tensor ``name`` (that of the base tensor)."""
        return self._shapes[name]

    def is_full(self, name: str) -> bool:
        """Whether ``name`` is saved in full (``modules_to_save``), so its rows need the base."""
        return name in self._full

    def rows(self, name: str, start: int, stop: int, base: RowSource | None = None) -> Tensor:
        """Rows ``start:stop`` of ``ΔW`` for base tensor ``name``, in float32.

        LoRA weights give ``s · B[start:stop] @ A`` (or the transposed product's rows). Tensors saved
        in full give ``saved − base`` and need ``base``, a reader of the base checkpoint.
        """
        if name in self._full:
            if base is None:
                raise ValueError(f"{name} is saved in full by the adapter; its rows need the base reader")
            saved = self._reader.rows(self._full[name], start, stop).float()
            return saved - base.rows(name, start, stop).float()
        lora = self._lora.get(name)
        if lora is None:
            raise KeyError(name)
        if lora.transpose:  # ΔW = s · Aᵀ Bᵀ: its rows are columns of A
            a = self._reader.get(lora.a).float()[:, start:stop]
            return lora.scale * (a.T @ self._reader.get(lora.b).float().T)
        b = self._reader.rows(lora.b, start, stop).float()
        return lora.scale * (b @ self._reader.get(lora.a).float())

    def tensor(self, name: str, base: RowSource | None = None) -> Tensor:
        """The whole ``ΔW`` of base tensor ``name`` in float32 (see :meth:`rows`)."""
        shape = self._shapes[name]
        return self.rows(name, 0, shape[0] if shape else 0, base)

    def close(self) -> None:
        """Close the adapter's weight file."""
        self._reader.close()

    def __enter__(self) -> LoraAdapter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LoraAdapter({str(self.path)!r}, {len(self._lora)} LoRA, {len(self._full)} full tensors)"


def open_adapter(
    path: str | Path,
    base_names: Sequence[str],
    base_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> LoraAdapter:
    """Open the PEFT LoRA adapter folder ``path`` against the base checkpoint's tensor names.

    Adapter modules are mapped onto ``base_names`` (a differing model prefix such as ``bert.`` is
    tolerated); a module matching none is a :class:`~gradfix.errors.CheckpointError`. Adapter
    types other than LoRA, and LoRA variants (DoRA, ...), are a :class:`~gradfix.errors.ConfigError`.
    With ``base_shapes``, every ``ΔW`` shape is checked against the base tensor's.
    """
    return LoraAdapter(path, base_names, base_shapes)


__all__ = [
    "CONFIG_NAME",
    "PEFT_PREFIX",
    "WEIGHTS_NAME",
    "LoraAdapter",
    "RowSource",
    "is_adapter_folder",
    "lora_names",
    "open_adapter",
    "pattern_key",
    "saved_name",
]
