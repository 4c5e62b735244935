"""Where and in which dtype a target is loaded to vote: the ``device`` and ``dtype`` settings.

``device`` is ``"cpu"`` (the default), ``"cuda"`` (the current CUDA device), ``"cuda:N"`` or
``"auto"`` (CUDA when PyTorch sees a device, else the CPU). ``dtype`` is ``"auto"`` (the default:
float32 on the CPU; on a GPU the checkpoint's own dtype, from ``config.json``'s ``dtype`` or
``torch_dtype``, else the dtype most of its floating tensors are stored in), ``"float32"``,
``"bfloat16"`` or ``"float16"``.

In float32 the votes are exactly those of the loop of one backward per sample; in bfloat16 and
float16 each per-sample product is accumulated in float32 (:mod:`gradfix.votes.tiles`) but the
model's weights and activations are rounded, so the votes agree with float32's on most
coordinates, not all. On the CPU, PyTorch runs all three dtypes; half precision there saves
memory, not time. What a job writes never depends on these settings: ``θ_B + α · mask(τ_A)`` is
computed from the checkpoints (float32 arithmetic, stored in each tensor's own dtype).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from gradfix.errors import CheckpointError, ConfigError
from gradfix.io import open_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtypes a target may vote in, by the names the settings use."""
_DEVICE = re.compile(r"^(cpu|cuda|cuda:\d+|auto)$")


@dataclass(frozen=True)
class Placement:
    """The device and dtype a target is loaded in for its votes."""

    device: torch.device
    dtype: torch.dtype

    def record(self) -> dict[str, str]:
        """``{"device": "cuda:0", "dtype": "bfloat16"}``, as ``gradfix.json`` states them."""
        return {"device": str(self.device), "dtype": dtype_name(self.dtype)}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def resolve_device(name: str) -> torch.device:
    """The device ``name`` (``cpu``, ``cuda``, ``cuda:N``, ``auto``) stands for here.

    A :class:`ConfigError` for another name, and for CUDA when PyTorch has no CUDA device or not
    that many.
    """
    text = str(name).strip().lower()
    if not _DEVICE.match(text):
        raise ConfigError(f"--device {name!r}: expected cpu, cuda, cuda:N or auto")
    if text == "cpu" or (text == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "a build without CUDA" if torch.version.cuda is None else "no CUDA device visible"
        raise ConfigError(
            f"--device {name}: PyTorch {torch.__version__} has {build}; use --device cpu (or auto)"
        )
    index = torch.cuda.current_device() if text in ("cuda", "auto") else int(text.split(":")[1])
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"--device {name}: PyTorch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def checkpoint_dtype(path: str | Path) -> torch.dtype | None:
    """The dtype ``path`` is published in, when it is one of :data:`DTYPES` (else ``None``).

    ``config.json``'s ``dtype`` (or ``torch_dtype``) when the folder has one that names a dtype,
    else the dtype of most floating tensors in the weights' headers (no tensor is read).
    """
    folder = Path(path)
    config = folder / "config.json"
    if folder.is_dir() and config.is_file():
        try:
            values = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{config}: cannot read: {exc}") from exc
        if isinstance(values, dict):
            for key in ("dtype", "torch_dtype"):
                named = values.get(key)
                if isinstance(named, str) and named.removeprefix("torch.") in DTYPES:
                    return DTYPES[named.removeprefix("torch.")]
    with open_checkpoint(folder) as reader:
        stored = Counter(d for d in reader.dtypes().values() if d.is_floating_point)
    for dtype, _ in stored.most_common():
        if dtype in DTYPES.values():
            return dtype
    return None


def resolve_dtype(name: str, device: torch.device, target: str | Path) -> torch.dtype:
    """The dtype ``name`` stands for on ``device`` for the checkpoint ``target``.

    ``auto`` is float32 on the CPU and the checkpoint's dtype on a GPU (float32 when it has none of
    :data:`DTYPES`). A :class:`ConfigError` for an unknown name and for bfloat16 on a CUDA device
    without it (before Ampere).
    """
    if name == "auto":
        dtype = torch.float32 if device.type == "cpu" else (checkpoint_dtype(target) or torch.float32)
    elif name in DTYPES:
        dtype = DTYPES[name]
    else:
        raise ConfigError(f"--dtype {name!r}: expected auto, {', '.join(DTYPES)}")
    if dtype == torch.bfloat16 and device.type == "cuda" and not _cuda_bf16(device):
        gpu = torch.cuda.get_device_name(device)
        raise ConfigError(
            f"--dtype bfloat16: {device} ({gpu}) does not compute in bfloat16; use float16 or float32"
        )
    return dtype


def _cuda_bf16(device: torch.device) -> bool:
    with torch.cuda.device(device):
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def resolve_placement(device: str, dtype: str, target: str | Path) -> Placement:
    """Where and in which dtype the target ``target`` votes, from the ``device`` and ``dtype``
    settings (:func:`resolve_device`, :func:`resolve_dtype`); cheap, so jobs check it first."""
    where = resolve_device(device)
    return Placement(where, resolve_dtype(dtype, where, target))


__all__ = [
    "DTYPES",
    "Placement",
    "checkpoint_dtype",
    "dtype_name",
    "resolve_device",
    "resolve_dtype",
    "resolve_placement",
]
