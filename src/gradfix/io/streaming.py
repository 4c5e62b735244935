"""Safetensors written as a stream: header first (from the known names, dtypes and shapes), then
each tensor's bytes in order, possibly in row chunks, so that memory never holds a whole shard,
nor even a whole tensor.
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

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
if hasattr(torch, "float8_e4m3fn"):
    _DTYPES[torch.float8_e4m3fn] = "F8_E4M3"
    _DTYPES[torch.float8_e5m2] = "F8_E5M2"


@dataclass(frozen=True)
class TensorPlan:
    """A tensor to be written: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Size of its data in bytes."""
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(tensors: Sequence[TensorPlan], max_shard_bytes: int) -> list[list[TensorPlan]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (a larger tensor alone)."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


class StreamingSafetensorsFile:
    """One safetensors file whose header is written up front and whose data follows in order.

    Call :meth:`write` with each tensor's data in plan order; a tensor may come in several
    row-major chunks. :meth:`close` checks that every byte announced in the header was written.
    """

    def __init__(self, path: Path, tensors: Sequence[TensorPlan], metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.tensors = list(tensors)
        header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for t in self.tensors:
            if t.dtype not in _DTYPES:
                raise ValueError(f"{t.name}: dtype {t.dtype} cannot be written to safetensors")
            header[t.name] = {
                "dtype": _DTYPES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + t.nbytes],
            }
            offset += t.nbytes
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
        if data.numel() == 0 and any(t.name == name for t in self.tensors):
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
        if self._written > current.nbytes:
            raise ValueError(f"{name}: more data than its shape {list(current.shape)} holds")
        if self._written == current.nbytes:
            self._index += 1
            self._written = 0
            self._skip_empty()

    def _skip_empty(self) -> None:
        while self._index < len(self.tensors) and self.tensors[self._index].nbytes == 0:
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
    """Sharded safetensors output from a plan: ``model.safetensors`` or HF-named shards + index."""

    def __init__(
        self,
        out_dir: Path,
        tensors: Sequence[TensorPlan],
        max_shard_bytes: int,
        metadata: Mapping[str, str] | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.shards = plan_shards(tensors, max_shard_bytes) or [[]]
        count = len(self.shards)
        self.names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
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
            index_file = self.out_dir / "model.safetensors.index.json"
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
