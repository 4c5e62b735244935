"""Lazy, read-only access to model checkpoints on disk.

Supported layouts:

* a single ``.safetensors`` file, or a folder holding ``model.safetensors``;
* a Hugging Face sharded folder (``model.safetensors.index.json`` plus shards);
* a PyTorch ``.bin`` / ``.pt`` / ``.pth`` file, or a folder holding ``pytorch_model.bin`` or
  ``pytorch_model.bin.index.json``.

Safetensors files are read one tensor at a time; shapes and dtypes come from the file headers
without touching tensor data. PyTorch files are only ever loaded with
``torch.load(..., weights_only=True)``, and memory-mapped only once every storage record has been
checked to hold the bytes its tensors need. Every weight file a folder or an index names must lie
inside that folder (for a Hub snapshot: in the cache's ``blobs/``), symbolic links included.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from gradfix.errors import CheckpointError
from gradfix.io.paths import allowed_roots, check_inside, path_exists
from gradfix.io.shards import Shard, _short, _TorchShard, open_shard

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_SINGLE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_FOLDER_CANDIDATES = (SAFETENSORS_SINGLE, SAFETENSORS_INDEX, TORCH_SINGLE, TORCH_INDEX)
_WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)


def _read_index(index: Path) -> dict[str, str]:
    """Parse a Hugging Face shard index and return its ``weight_map``."""
    duplicates: dict[int, list[str]] = {}

    def keep_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result and result[key] != value:
                duplicates.setdefault(id(result), []).append(f"{key!r}: {result[key]!r} and {value!r}")
            result[key] = value
        return result

    try:
        data = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=keep_pairs)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{index}: not a valid JSON shard index ({_short(exc)})") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: shard index has no 'weight_map' (or it is empty)")
    if id(weight_map) in duplicates:
        clash = duplicates[id(weight_map)][0]
        raise CheckpointError(f"{index}: a tensor is listed in two shards ({clash})")
    for name, shard in weight_map.items():
        problem = _bad_shard_name(shard)
        if problem:
            raise CheckpointError(f"{index}: weight_map entry {_quote(name)}: {problem}")
    return weight_map


def _quote(text: object, limit: int = 80) -> str:
    """``repr`` of a name from a file (control characters escaped), shortened past ``limit``."""
    shown = repr(text)
    if len(shown) <= limit:
        return shown
    size = f" ({len(text)} characters)" if isinstance(text, str) else ""
    return f"{shown[: limit - 4]}...{shown[0]}{size}"


_MAX_NAME_BYTES = 255
"""Longest file name (one path component) that common file systems accept."""


def _bad_shard_name(shard: object) -> str | None:
    """Why ``shard`` is not an acceptable shard file name for an index (``None`` if it is)."""
    if not isinstance(shard, str) or not shard:
        return f"{_quote(shard)} is not a file name"
    if any(ord(c) < 32 or ord(c) == 127 for c in shard):
        return f"shard {_quote(shard)} holds a control character"
    rel = Path(shard)
    if rel.is_absolute() or ".." in rel.parts or "\\" in shard:
        return f"shard {_quote(shard)} lies outside the index's folder"
    if any(len(part.encode("utf-8", "surrogatepass")) > _MAX_NAME_BYTES for part in rel.parts):
        return f"shard {_quote(shard)} is not a valid file name (longer than {_MAX_NAME_BYTES} bytes)"
    return None


def _folder_weight_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))


_Index = tuple[Path, dict[str, str]]


def _shard_files(index: Path, weight_map: dict[str, str]) -> list[Path]:
    """The shard files an index names, each checked to be a file inside the index's folder."""
    files = [index.parent / s for s in sorted(set(weight_map.values()))]
    roots = allowed_roots(index.parent)
    for shard in files:
        if path_exists(shard):
            check_inside(index.parent, shard, roots)
        try:
            present = shard.is_file()
        except OSError as exc:
            reason = _short(exc)
            raise CheckpointError(f"{index}: shard {_quote(shard.name)} cannot be read ({reason})") from exc
        if not present:
            where = _quote(str(shard), 200)
            raise CheckpointError(f"{index}: shard {_quote(shard.name)} is missing ({where})")
    return files


def _resolve(path: Path) -> tuple[list[Path], _Index | None]:
    """Find the weight files behind ``path``; also return the shard index if there is one."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        found = next((path / n for n in _FOLDER_CANDIDATES if (path / n).is_file()), None)
        if found is None:
            held = _folder_weight_files(path)
            shown = ", ".join(held[:8]) + (f" and {len(held) - 8} more" if len(held) > 8 else "")
            holds = f"it holds {shown}; pass one directly" if held else "it holds no weight files"
            raise CheckpointError(
                f"{path}: no recognised checkpoint in this folder (looked for "
                f"{', '.join(_FOLDER_CANDIDATES)}; {holds})"
            )
        check_inside(path, found)
        path = found
    name = path.name.lower()
    if name.endswith((".safetensors.index.json", ".bin.index.json")):
        weight_map = _read_index(path)
        return _shard_files(path, weight_map), (path, weight_map)
    if name.endswith(".safetensors") or name.endswith(TORCH_SUFFIXES):
        return [path], None
    raise CheckpointError(
        f"{path}: unrecognised checkpoint file type (expected .safetensors, .bin, .pt, .pth, .ckpt "
        f"or a shard index .json)"
    )


class CheckpointReader:
    """Read-only, lazy view of the tensors of one checkpoint (single file or sharded).

    Safetensors shards are opened on first use and their handles cached; ``close`` releases
    them, and any later access transparently opens them again.
    """

    def __init__(self, path: str | Path) -> None:
        """Locate the weight files behind ``path`` and index the tensor names they hold."""
        self.path = Path(path)
        files, index = _resolve(self.path)
        self.files: list[Path] = files
        self._shards = [open_shard(f) for f in files]
        self._where: dict[str, int] = {}
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._dtypes: dict[str, torch.dtype] | None = None
        try:
            self._scan(index)
        except BaseException:
            self.close()
            raise

    def _scan(self, index: _Index | None) -> None:
        for i, shard in enumerate(self._shards):
            for name in shard.names():
                if name in self._where:
                    first = self.files[self._where[name]].name
                    raise CheckpointError(
                        f"{self.path}: tensor {name!r} is in two shards ({first} and {self.files[i].name})"
                    )
                self._where[name] = i
        if index is None:
            return
        index_path, weight_map = index
        for name, shard_name in weight_map.items():
            at = self._where.get(name)
            if at is None or self.files[at] != index_path.parent / shard_name:
                raise CheckpointError(
                    f"{index_path}: weight_map puts tensor {name!r} in {shard_name!r}, "
                    f"but that file does not hold it"
                )

    def _shard_of(self, name: str) -> Shard:
        at = self._where.get(name)
        if at is None:
            raise CheckpointError(f"{self.path}: no tensor named {name!r} in this checkpoint")
        return self._shards[at]

    def names(self) -> list[str]:
        """Tensor names, in file order (shard by shard)."""
        return list(self._where)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every tensor, read from the file headers."""
        if self._shapes is None:
            self._shapes = {n: self._shards[i].shape(n) for n, i in self._where.items()}
        return dict(self._shapes)

    def dtypes(self) -> dict[str, torch.dtype]:
        """Dtype of every tensor, read from the file headers."""
        if self._dtypes is None:
            self._dtypes = {n: self._shards[i].dtype(n) for n, i in self._where.items()}
        return dict(self._dtypes)

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (on CPU). Raises CheckpointError for an unknown name."""
        return self._shard_of(name).tensor(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (first axis) of one tensor; a 0-d tensor is returned whole.

        Safetensors files are read with plain reads, so that streaming a large checkpoint slice
        by slice keeps only one slice in memory.
        """
        return self._shard_of(name).rows(name, start, stop)

    def file_of(self, name: str) -> Path:
        """The weight file that holds tensor ``name`` (for messages that name the file)."""
        return self._shard_of(name).path

    def metadata(self) -> dict[str, str]:
        """Safetensors header metadata of the first weight file ({} for PyTorch files)."""
        return self._shards[0].metadata() if self._shards else {}

    def close(self) -> None:
        """Release open file handles and memory maps."""
        for shard in self._shards:
            shard.close()

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._where))

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, tensors={len(self)}, files={len(self.files)})"


def open_checkpoint(path: str | Path) -> CheckpointReader:
    """Open a checkpoint file or model folder for lazy reading.

    Accepts a ``.safetensors`` file, a ``.bin``/``.pt``/``.pth``/``.ckpt`` file, a shard index, or a
    folder holding ``model.safetensors``, ``model.safetensors.index.json``,
    ``pytorch_model.bin`` or ``pytorch_model.bin.index.json`` (first match wins, so
    safetensors is preferred). Raises CheckpointError naming the file on any problem.
    """
    return CheckpointReader(path)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load every tensor of a checkpoint into memory as an independent CPU copy."""
    with open_checkpoint(path) as reader:
        result: dict[str, torch.Tensor] = {}
        for name in reader.names():
            tensor = reader.get(name)
            shard = reader._shard_of(name)
            # PyTorch files are memory-mapped and may share storage between tensors.
            result[name] = tensor.clone() if isinstance(shard, _TorchShard) else tensor
        return result


SLICE_BYTES = 4 * 2**20
"""Bytes of one row slice: what the streaming jobs hold of a tensor at a time."""


def row_slices(
    shape: Sequence[int], itemsize: int = 4, budget: int | None = SLICE_BYTES
) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` row ranges of about ``budget`` bytes (a 0-d tensor is one slice).

    ``budget=None`` gives the whole tensor as one slice (the in-memory paths).
    """
    if not shape:
        yield 0, 1
        return
    if budget is None:
        yield 0, shape[0]
        return
    row = max(1, math.prod(shape[1:]) * itemsize)
    step = max(1, budget // row)
    for start in range(0, shape[0], step):
        yield start, min(shape[0], start + step)
    if shape[0] == 0:
        yield 0, 0
