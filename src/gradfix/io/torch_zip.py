"""Checks of a PyTorch zip checkpoint's records before ``torch.load`` memory-maps them.

``torch.load(..., mmap=True)`` maps each storage at its record's offset in the file and trusts the
size the pickle announces, so a record shorter than its storage would be read from the bytes that
follow it. :func:`check_torch_zip` reads the zip directory and the pickle (with an unpickler that
imports nothing and calls nothing but its own placeholders) and refuses, with one line naming the
file and the tensor, every storage whose record is missing, compressed, outside the file or
shorter than the tensors built on it need.
"""

from __future__ import annotations

import io
import pickle  # the unpickler below resolves no global and runs no code from the file
import struct
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradfix.errors import CheckpointError

_MAX_PICKLE_BYTES = 256 * 2**20
"""Largest ``data.pkl`` record read (a state dict's pickle holds names and shapes, not data)."""


class _Global:
    """A global the pickle names; calling it builds a :class:`_Call` instead of running anything."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any) -> _Call:
        return _Call(self.name, args)


class _Call:
    """What a pickled call would have built: the callable's name, its arguments and later items."""

    def __init__(self, name: str, args: tuple[Any, ...]) -> None:
        self.name, self.args = name, args
        self.items: dict[Any, Any] = {}
        self.state: Any = None

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def __setstate__(self, state: Any) -> None:
        self.state = state


@dataclass(frozen=True)
class _Storage:
    """A storage the pickle refers to: its record key, element size and element count."""

    key: str
    itemsize: int
    numel: int


def _storage_itemsize(kind: Any) -> int | None:
    """Bytes per element of a pickled storage type (``torch.FloatStorage``, ``UntypedStorage``...)."""
    name = kind.name if isinstance(kind, _Global) else ""
    if name in ("torch.UntypedStorage", "torch.storage.UntypedStorage"):
        return 1
    cls = getattr(torch, name[len("torch.") :], None) if name.startswith("torch.") else None
    legacy = getattr(torch.storage, "_LegacyStorage", ())
    if isinstance(cls, type) and legacy and issubclass(cls, legacy):
        with warnings.catch_warnings():  # reading a legacy storage class's dtype warns
            warnings.simplefilter("ignore")
            dtype = getattr(cls, "dtype", None)
        return int(torch.empty((), dtype=dtype).element_size()) if isinstance(dtype, torch.dtype) else None
    return None


class _PlaceholderUnpickler(pickle.Unpickler):
    """Unpickles to placeholders only: no module is imported and no callable of the file runs."""

    def __init__(self, stream: io.BytesIO) -> None:
        super().__init__(stream)
        self.storages: list[_Storage] = []

    def find_class(self, module: str, name: str) -> Any:
        return _Global(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage":
            itemsize = _storage_itemsize(pid[1])
            if itemsize is not None and isinstance(pid[2], str) and isinstance(pid[4], int):
                self.storages.append(_Storage(pid[2], itemsize, pid[4]))
                return self.storages[-1]
        raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")


def _tensor_dtype_size(call: _Call, storage: _Storage) -> int:
    """Element size of the tensor a ``_rebuild_tensor_v2/v3`` call builds."""
    if call.name.endswith("_v3") and len(call.args) > 6 and isinstance(call.args[6], _Global):
        dtype = getattr(torch, call.args[6].name.rpartition(".")[2], None)
        if isinstance(dtype, torch.dtype):
            return int(torch.empty((), dtype=dtype).element_size())
    return storage.itemsize


def _tensors(tree: Any) -> Iterator[tuple[str, _Call]]:
    """Every tensor-building call in the unpickled placeholders, with the key it sits under.

    Each object is visited once, so a pickle that shares one list many times stays linear.
    """
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [("?", tree)]
    while stack:
        where, obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, _Call):
            if obj.name.startswith("torch._utils._rebuild_tensor") and obj.args:
                yield where, obj
                continue
            children = [(None, a) for a in obj.args] + list(obj.items.items()) + [(None, obj.state)]
        elif isinstance(obj, dict):
            children = list(obj.items())
        elif isinstance(obj, (list, tuple)):
            children = [(None, item) for item in obj]
        else:
            continue
        stack.extend((key if isinstance(key, str) else where, value) for key, value in reversed(children))


def _needed_bytes(call: _Call, storage: _Storage) -> int:
    """Bytes of its storage that the tensor built by ``call`` reaches (at least the storage's own)."""
    offset, size, stride = (*call.args[1:4], None, None, None)[:3]
    itemsize = _tensor_dtype_size(call, storage)
    reach = 0
    shaped = isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
    if isinstance(offset, int) and shaped and all(isinstance(n, int) and n > 0 for n in size):
        pairs = zip(size, stride, strict=True)
        reach = offset + 1 + sum((n - 1) * abs(s) for n, s in pairs if isinstance(s, int))
    return max(reach * itemsize, storage.numel * storage.itemsize)


def _data_span(handle: Any, info: zipfile.ZipInfo) -> tuple[int, int]:
    """Where a record's bytes start in the file and how many there are (from its local header)."""
    handle.seek(info.header_offset)
    header = handle.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"record {info.filename!r} has no valid local header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _records(path: Path) -> tuple[str, dict[str, int], bytes]:
    """The archive's prefix, the size of every ``data/<key>`` record, and the ``data.pkl`` bytes."""
    size = path.stat().st_size
    with zipfile.ZipFile(path) as archive, open(path, "rb") as handle:
        infos = archive.infolist()
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise CheckpointError("a record name appears twice in the zip directory")
        prefix = names[0].split("/", 1)[0] if names else ""
        pkl = next((i for i in infos if i.filename == f"{prefix}/data.pkl"), None)
        if pkl is None:
            raise CheckpointError("the archive has no data.pkl record")
        sizes: dict[str, int] = {}
        for info in infos:
            start, length = _data_span(handle, info)
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(f"record {info.filename!r} is compressed")
            if start + length > size:
                raise CheckpointError(f"record {info.filename!r} runs past the end of the file")
            sizes[info.filename] = length
        if pkl.file_size > _MAX_PICKLE_BYTES:
            raise CheckpointError(f"its data.pkl record holds {pkl.file_size} bytes")
        return prefix, sizes, archive.read(pkl)


def check_torch_zip(path: Path) -> bool:
    """Refuse a zip checkpoint whose storage records do not hold the bytes its tensors need.

    Raises :class:`CheckpointError` (one line, naming the file and the tensor or record). Returns
    whether every storage was checked: ``False`` for a pickle this check cannot follow, which the
    caller must then load without memory-mapping (``torch.load`` reads each record whole).
    """
    try:
        prefix, sizes, raw = _records(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: not a valid PyTorch checkpoint ({exc})") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        text = " ".join(str(exc).split())[:150]
        raise CheckpointError(f"{path}: not a valid PyTorch checkpoint (a broken zip: {text})") from None
    try:
        unpickler = _PlaceholderUnpickler(io.BytesIO(raw))
        tree = unpickler.load()
    except Exception:  # a pickle the check cannot follow: loaded without mmap, torch.load decides
        return False
    for name, call in _tensors(tree):
        storage = call.args[0]
        if isinstance(storage, _Storage):
            _check_record(path, sizes, f"{prefix}/data/{storage.key}", _needed_bytes(call, storage), name)
    for storage in unpickler.storages:
        _check_record(path, sizes, f"{prefix}/data/{storage.key}", storage.numel * storage.itemsize, None)
    return True


def _check_record(path: Path, sizes: dict[str, int], record: str, needed: int, name: str | None) -> None:
    """Raise unless ``record`` exists and holds at least ``needed`` bytes."""
    what = f"tensor {name!r}" if name is not None else "a storage"
    if record not in sizes:
        raise CheckpointError(f"{path}: {what} refers to a missing storage record {record!r}")
    if needed > sizes[record]:
        raise CheckpointError(
            f"{path}: {what} needs {needed} bytes but its storage record {record!r} holds "
            f"{sizes[record]}; the file is truncated or corrupted"
        )
