"""Safetensors written as a stream: header first (from the known names, dtypes and shapes), then
each tensor's bytes in order, possibly in row chunks, so that memory never holds a whole shard,
nor even a whole tensor.

This is gradfix's one safetensors writer: :func:`plan_shards` splits the tensors into shards,
:func:`shard_file_names` names them the Hugging Face way, :class:`StreamingSafetensorsFile`
writes one file (header metadata sorted by key) and :class:`StreamingShardedWriter` writes the
shards and ``model.safetensors.index.json``. :func:`gradfix.io.save_state_dict` feeds it a
state dict held in memory.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from gradfix.errors import OutputError
from gradfix.settings import DEFAULT_SHARD_BYTES

SINGLE_FILE_NAME = "model.safetensors"
"""The weight file of an output that fits in one shard."""
INDEX_FILE_NAME = "model.safetensors.index.json"
"""The index of a sharded output (``weight_map``: tensor name → shard file)."""

_DTYPE_CODES = (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
    ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"),
    ("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"), ("U8", "uint8"), ("BOOL", "bool"),
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("F8_E8M0", "float8_e8m0fnu"),
)  # fmt: skip
_DTYPES: dict[torch.dtype, str] = {
    getattr(torch, name): code
    for code, name in _DTYPE_CODES
    if isinstance(getattr(torch, name, None), torch.dtype)
}
"""Every dtype gradfix reads and writes back unchanged, with its safetensors code (those this torch
has). Complex tensors are left out: every reader refuses them up front."""
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {code: dtype for dtype, code in _DTYPES.items()}
"""Safetensors dtype code → torch dtype: what the readers accept and the writer writes back."""


def dtype_code(dtype: torch.dtype) -> str | None:
    """The safetensors code of ``dtype``, or ``None`` when gradfix cannot write it."""
    return _DTYPES.get(dtype)


_ELEMENT_SIZES: dict[torch.dtype, int] = {}


def _element_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype`` (looked up once per dtype)."""
    size = _ELEMENT_SIZES.get(dtype)
    if size is None:
        size = _ELEMENT_SIZES[dtype] = torch.empty((), dtype=dtype).element_size()
    return size


@dataclass(frozen=True)
class TensorPlan:
    """A tensor to be written: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Size of its data in bytes."""
        return math.prod(self.shape) * _element_size(self.dtype)


def plan_shards(tensors: Sequence[TensorPlan], max_shard_bytes: int) -> list[list[TensorPlan]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (a larger tensor alone)."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for t in tensors:
        nbytes = t.nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards if shards[0] else []


def shard_file_names(count: int) -> list[str]:
    """File names of ``count`` shards: ``model.safetensors`` alone, else ``model-0000i-of-0000n``."""
    if count == 1:
        return [SINGLE_FILE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def check_plan(tensors: Sequence[TensorPlan]) -> None:
    """Raise ``ValueError`` for an empty or repeated tensor name or a dtype safetensors cannot hold."""
    seen: set[str] = set()
    for t in tensors:
        if not isinstance(t.name, str) or not t.name:
            raise ValueError(f"tensor name must be a non-empty string, got {t.name!r}")
        if t.name in seen:
            raise ValueError(f"tensor '{t.name}' is planned twice")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{t.name}: dtype {t.dtype} cannot be written to safetensors")
        seen.add(t.name)


class StreamingSafetensorsFile:
    """One safetensors file whose header is written up front and whose data follows in order.

    Call :meth:`write` with each tensor's data in plan order; a tensor may come in several
    row-major chunks. :meth:`close` checks that every byte announced in the header was written.
    The header's ``__metadata__`` is ``{"format": "pt", **metadata}`` with its keys sorted, so the
    same tensors and metadata always give the same bytes.
    """

    def __init__(self, path: Path, tensors: Sequence[TensorPlan], metadata: Mapping[str, str] | None = None):
        """Create ``path`` and write its header; the data of ``tensors`` follows through :meth:`write`."""
        self.path = Path(path)
        self.tensors = list(tensors)
        meta = {"format": "pt", **(metadata or {})}
        header: dict[str, object] = {"__metadata__": dict(sorted(meta.items()))}
        self._sizes: list[int] = []
        offset = 0
        for t in self.tensors:
            if t.dtype not in _DTYPES:
                raise ValueError(f"{t.name}: dtype {t.dtype} cannot be written to safetensors")
            nbytes = t.nbytes
            header[t.name] = {
                "dtype": _DTYPES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._sizes.append(nbytes)
            offset += nbytes
        self._names = frozenset(t.name for t in self.tensors)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file: BinaryIO = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._index = 0
        self._written = 0
        self._skip_empty()

    def write(self, name: str, data: torch.Tensor) -> None:
        """Append (part of) tensor ``name``'s data, in row-major order, in its planned dtype."""
        if data.numel() == 0 and name in self._names:
            return  # nothing to write (empty tensors, or an empty chunk)
        if self._index >= len(self.tensors):
            raise ValueError(f"{self.path}: {name} was not planned for this file")
        current = self.tensors[self._index]
        if name != current.name:
            raise ValueError(f"{self.path}: expected data of {current.name}, got {name}")
        if data.dtype != current.dtype:
            raise ValueError(f"{name}: data in {data.dtype}, planned {current.dtype}")
        chunk = data.detach().contiguous().reshape(-1)
        if chunk.numel():
            self._file.write(chunk.view(torch.uint8).numpy().tobytes())
        self._written += chunk.numel() * chunk.element_size()
        size = self._sizes[self._index]
        if self._written > size:
            raise ValueError(f"{name}: more data than its shape {list(current.shape)} holds")
        if self._written == size:
            self._index += 1
            self._written = 0
            self._skip_empty()

    def _skip_empty(self) -> None:
        """Move past the zero-size tensors that come next (each is passed over once)."""
        while self._index < len(self._sizes) and self._sizes[self._index] == 0:
            self._index += 1

    @property
    def pending(self) -> str | None:
        """The name of the tensor whose data comes next (``None`` when complete)."""
        return self.tensors[self._index].name if self._index < len(self.tensors) else None

    def close(self) -> None:
        """Finish the file; raise if a tensor's data is missing."""
        self._file.close()
        if self.pending is not None:
            raise ValueError(f"{self.path}: no data was written for {self.pending}")

    def abort(self) -> None:
        """Close without checking (the caller discards the file)."""
        self._file.close()


class StreamingShardedWriter:
    """Sharded safetensors output from a plan: ``model.safetensors`` or HF-named shards + index.

    The plan is split by :func:`plan_shards` into shards of at most ``max_shard_bytes`` (a larger
    tensor gets a shard of its own); :meth:`write` takes each tensor's data in plan order, whole
    or in row chunks, and :meth:`close` finishes the files. Every file's header metadata is
    ``{"format": "pt", **metadata}``, sorted by key.
    """

    def __init__(
        self,
        out_dir: str | Path,
        tensors: Sequence[TensorPlan],
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        metadata: Mapping[str, str] | None = None,
    ):
        """Plan the shards of ``tensors`` in ``out_dir`` (an existing folder); nothing is written yet."""
        if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int):
            raise TypeError(f"max_shard_bytes must be an int, got {type(max_shard_bytes).__name__}")
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        for key, value in (metadata or {}).items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"metadata must map str to str; got {key!r}: {value!r}")
        check_plan(tensors)
        self.out_dir = Path(out_dir)
        self.shards = plan_shards(tensors, max_shard_bytes) or [[]]
        self.names = shard_file_names(len(self.shards))
        self._shard_of = {t.name: i for i, shard in enumerate(self.shards) for t in shard}
        self.metadata = metadata
        self._open: StreamingSafetensorsFile | None = None
        self._open_index = -1

    def write(self, name: str, data: torch.Tensor) -> None:
        """Append (part of) tensor ``name``'s data; tensors must come in plan order.

        A failed write (a full disk, say) raises :class:`OutputError` naming the shard.
        """
        index = self._shard_of.get(name)
        if index is None:
            raise ValueError(f"{name} is not in the output plan")
        try:
            if index != self._open_index:
                if self._open is not None:
                    self._open.close()
                self._open_index = index
                self._open = StreamingSafetensorsFile(
                    self.out_dir / self.names[index], self.shards[index], self.metadata
                )
            assert self._open is not None
            self._open.write(name, data)
        except OSError as exc:
            reason = exc.strerror or exc
            raise OutputError(f"cannot write weight shard {self._open_index + 1} ({reason})") from exc

    def close(self) -> list[Path]:
        """Finish every shard (and the index when there are several); return the files."""
        try:
            return self._finish()
        except OSError as exc:
            raise OutputError(f"cannot finish the weight files ({exc.strerror or exc})") from exc

    def _finish(self) -> list[Path]:
        """Close the open shard, write the shards never opened (all-empty ones) and the index."""
        for index in range(max(self._open_index, 0), len(self.shards)):
            if index == self._open_index and self._open is not None:
                self._open.close()
            else:  # a shard never opened: only valid when all its tensors are empty
                StreamingSafetensorsFile(
                    self.out_dir / self.names[index], self.shards[index], self.metadata
                ).close()
        self._open = None
        self._open_index = len(self.shards)
        if len(self.shards) > 1:
            weight_map = {t.name: self.names[i] for i, shard in enumerate(self.shards) for t in shard}
            total = sum(t.nbytes for shard in self.shards for t in shard)
            index_file = self.out_dir / INDEX_FILE_NAME
            index_file.write_text(
                json.dumps(
                    {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True
                )
                + "\n"
            )
        return [self.out_dir / n for n in self.names]

    def abort(self) -> None:
        """Close an open file without checking (the caller discards the output folder)."""
        if self._open is not None:
            self._open.abort()
            self._open = None
