"""One weight file: a safetensors file or a PyTorch pickle-format file, read one tensor at a time.

Every failure on a malformed file becomes a :class:`CheckpointError` naming the file (and the
tensor, where there is one). PyTorch files are only ever loaded with
``torch.load(..., weights_only=True)``; a file that would need full unpickling is refused with a
message that says why and how to convert it.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from pickle import UnpicklingError  # exception class only; nothing is unpickled here
from typing import Any

import torch
from safetensors import safe_open

from gradfix.errors import CheckpointError
from gradfix.io.paths import open_regular
from gradfix.io.streaming import SAFETENSORS_DTYPES, dtype_code
from gradfix.io.torch_zip import check_torch_zip


def _short(exc: BaseException, limit: int = 200) -> str:
    """One-line, length-limited description of an exception."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


_MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces


def _check_safetensors_header(path: Path) -> None:
    """Validate the 8-byte header length of a safetensors file before handing it to the library.

    A truncated file, a file of another format, or a declared header longer than the file (or
    than 100 MB) is refused here with a clear message, without allocating anything.
    """
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(9)
            handle.seek(0, 2)
            size = handle.tell()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read file ({_short(exc)})") from exc
    if size < 10:
        raise CheckpointError(
            f"{path}: not a valid safetensors file (only {size} bytes; the file is truncated or empty)"
        )
    declared = int.from_bytes(prefix[:8], "little")
    if declared > size - 8:
        raise CheckpointError(
            f"{path}: not a valid safetensors file (its header claims {declared} bytes but the file "
            f"has {size}; the file is truncated or not in safetensors format)"
        )
    if declared > _MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{path}: not a valid safetensors file (header of {declared} bytes exceeds the "
            f"{_MAX_HEADER_BYTES}-byte limit)"
        )
    if prefix[8:9] != b"{":
        raise CheckpointError(
            f"{path}: not a valid safetensors file (the header is not a JSON object; the file is "
            "corrupted or in another format)"
        )


class _SafetensorsShard:
    """One safetensors file, opened on first use and kept open until ``close``.

    Every failure of the safetensors library on a malformed file becomes a
    :class:`CheckpointError` naming the file (and the tensor, where there is one).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: Any = None
        self._layout: tuple[int, dict[str, Any]] | None = None

    def _open(self) -> Any:
        if self._handle is None:
            _check_safetensors_header(self.path)
            try:
                self._handle = safe_open(str(self.path), framework="pt")
            except (PermissionError, FileNotFoundError, IsADirectoryError) as exc:
                raise CheckpointError(f"{self.path}: cannot read file ({_short(exc)})") from exc
            except Exception as exc:  # the library raises several types on malformed input
                raise CheckpointError(f"{self.path}: not a valid safetensors file ({_short(exc)})") from exc
        return self._handle

    def _fail(self, exc: Exception, name: str | None = None) -> CheckpointError:
        what = f"cannot read tensor {name!r}" if name is not None else "cannot read the header"
        return CheckpointError(f"{self.path}: {what} ({_short(exc)}); the file is corrupted")

    def names(self) -> list[str]:
        handle = self._open()
        try:
            keys = handle.offset_keys() if hasattr(handle, "offset_keys") else handle.keys()
            return [str(k) for k in keys]
        except Exception as exc:
            raise self._fail(exc) from exc

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self._open()
        try:
            return tuple(int(d) for d in handle.get_slice(name).get_shape())
        except Exception as exc:
            raise self._fail(exc, name) from exc

    def dtype(self, name: str) -> torch.dtype:
        handle = self._open()
        try:
            code = handle.get_slice(name).get_dtype()
        except Exception as exc:
            raise self._fail(exc, name) from exc
        dtype = SAFETENSORS_DTYPES.get(code)
        if dtype is None:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has dtype {code}, which gradfix cannot read and write back"
            )
        return dtype

    def tensor(self, name: str) -> torch.Tensor:
        handle = self._open()
        try:
            tensor = handle.get_tensor(name)
        except Exception as exc:
            raise self._fail(exc, name) from exc
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{self.path}: tensor {name!r} could not be read as a torch tensor")
        return tensor

    def metadata(self) -> dict[str, str]:
        handle = self._open()
        try:
            return {str(k): str(v) for k, v in (handle.metadata() or {}).items()}
        except Exception as exc:
            raise self._fail(exc) from exc

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor, read with plain file reads (no memory map).

        Reading a large checkpoint slice by slice this way keeps the process's resident memory at
        the size of one slice; a memory-mapped read would keep every page it touched resident.
        """
        shape, dtype = self.shape(name), self.dtype(name)
        if not shape:
            return self.tensor(name)
        data_start, entries = self._offsets()
        begin = int(entries[name]["data_offsets"][0])
        row_bytes = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
        start, stop = max(0, start), min(shape[0], stop)
        count = max(0, stop - start) * row_bytes
        buffer = bytearray(count)
        try:
            with open(self.path, "rb") as handle:
                handle.seek(data_start + begin + start * row_bytes)
                got = handle.readinto(buffer)
        except OSError as exc:
            raise self._fail(exc, name) from exc
        if got != count:
            raise CheckpointError(f"{self.path}: tensor {name!r} is cut short; the file is truncated")
        out = torch.frombuffer(buffer, dtype=dtype) if count else torch.empty(0, dtype=dtype)
        return out.reshape(max(0, stop - start), *shape[1:])

    def _offsets(self) -> tuple[int, dict[str, Any]]:
        if self._layout is None:
            self._open()  # validates the header
            with open(self.path, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size))
            self._layout = (8 + size, header)
        return self._layout

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None and hasattr(handle, "__exit__"):
            handle.__exit__(None, None, None)


class _TorchShard:
    """One PyTorch pickle-format file, loaded on first use (memory-mapped once its records are checked)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tensors: dict[str, torch.Tensor] | None = None

    def _load(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            self._tensors = _load_torch_file(self.path)
        return self._tensors

    def names(self) -> list[str]:
        return list(self._load())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._load()[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._load()[name].dtype

    def tensor(self, name: str) -> torch.Tensor:
        return self._load()[name]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        tensor = self._load()[name]
        return tensor.clone() if tensor.dim() == 0 else tensor[start:stop].clone()

    def metadata(self) -> dict[str, str]:
        return {}

    def close(self) -> None:
        self._tensors = None


def _refusal_message(path: Path, exc: UnpicklingError) -> str:
    """Explain, in gradfix's own words and on one line, why ``weights_only=True`` rejected a file.

    torch's text (advice to re-run with ``weights_only=False`` included) is not quoted; only the
    name of a global it refused is taken from it.
    """
    found = re.search(r"Unsupported global: GLOBAL ([\w.]{1,200})", str(exc))
    convert = (
        "if you trust the file, load it yourself in a trusted environment and save the state "
        "dict with safetensors.torch.save_file, then pass the .safetensors file"
    )
    if found:
        return (
            f"{path}: refused: the file holds Python objects other than tensors (it names "
            f"{found.group(1)!r}) and loading it would run arbitrary code, so "
            f"torch.load(weights_only=True) rejected it; {convert}"
        )
    return (
        f"{path}: refused: torch.load(weights_only=True) cannot read it; the file is corrupted or "
        f"needs full unpickling, which could run arbitrary code; {convert}"
    )


def _is_tensor_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _dense(path: Path, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict, or a CheckpointError naming a tensor that is not a dense CPU tensor."""
    for name, tensor in tensors.items():
        if tensor.layout != torch.strided or tensor.device.type != "cpu" or tensor.is_quantized:
            kind = "quantized" if tensor.is_quantized else f"{tensor.layout} on {tensor.device}"
            raise CheckpointError(f"{path}: tensor {name!r} is {kind}; only dense tensors are supported")
        if dtype_code(tensor.dtype) is None:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {tensor.dtype}, which gradfix cannot write to "
                "safetensors; convert or drop it first"
            )
    return dict(tensors)


def _describe(obj: object) -> str:
    """Short description of a loaded object that is not a state dict."""
    if not isinstance(obj, Mapping):
        return f"a {type(obj).__name__}"
    keys = list(obj)
    shown = ", ".join(repr(k) for k in keys[:6]) + (", ..." if len(keys) > 6 else "")
    for key, value in obj.items():
        if not isinstance(key, str):
            return f"a dict with keys {shown} (key {key!r} is not a string)"
        if not isinstance(value, torch.Tensor):
            kind = type(value).__name__
            return f"a dict with keys {shown} ({key!r} holds a {kind}, not a tensor)"
    return f"a dict with keys {shown}"


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a PyTorch checkpoint with ``weights_only=True`` and return its state dict.

    A zip-format file is memory-mapped only once :func:`check_torch_zip` has found every storage
    record whole; a legacy (pre-zip) file, or one the check cannot follow, is read without mmap.
    """
    try:
        kind = sniff_format(path)
        if kind not in ("zip", "pickle"):
            raise CheckpointError(
                f"{path}: not a valid PyTorch checkpoint (neither a zip archive, a legacy PyTorch "
                "pickle nor a safetensors file; it is corrupted or in another format)"
            )
        mmap = kind == "zip" and check_torch_zip(path)
        with warnings.catch_warnings():  # a corrupted file is reported below, not warned about
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except CheckpointError:
        raise
    except UnpicklingError as exc:
        raise CheckpointError(_refusal_message(path, exc)) from None
    except (PermissionError, IsADirectoryError) as exc:
        raise CheckpointError(f"{path}: cannot read file ({_short(exc)})") from exc
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a valid PyTorch checkpoint ({type(exc).__name__}: {_short(exc)})"
        ) from exc
    if _is_tensor_dict(obj):
        return _dense(path, obj)
    if isinstance(obj, Mapping):
        nested = [k for k in ("state_dict", "model") if _is_tensor_dict(obj.get(k))]
        if len(nested) == 1:
            return _dense(path, obj[nested[0]])
        if len(nested) > 1:
            raise CheckpointError(
                f"{path}: both 'state_dict' and 'model' hold tensors; cannot tell which to use"
            )
    found = _describe(obj)
    raise CheckpointError(f"{path}: expected a dict of tensors (a state dict), found {found}")


Shard = _SafetensorsShard | _TorchShard


def sniff_format(path: Path) -> str:
    """What a weight file holds, from its first bytes: ``"zip"``, ``"safetensors"``, ``"pickle"``
    or ``"other"``.

    A PyTorch zip archive starts with ``PK\\x03\\x04``; a safetensors file with the 8-byte length
    of a JSON header that starts with ``{``; a legacy PyTorch file with a pickle protocol opcode.
    """
    try:
        with open_regular(path) as handle:  # a FIFO or a device would block or never end
            head = handle.read(9)
            size = handle.seek(0, 2)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read file ({_short(exc)})") from exc
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    return "pickle" if head[:1] == b"\x80" else "other"


def open_shard(path: Path) -> Shard:
    """The reader of one weight file, chosen by its content (then by its name when unclear).

    A safetensors file named ``.bin`` is read as safetensors; a PyTorch zip archive named
    ``.safetensors`` is refused with a message that says what it is.
    """
    kind = sniff_format(path)
    named_safetensors = path.name.lower().endswith(".safetensors")
    if kind == "zip" and named_safetensors:
        raise CheckpointError(
            f"{path}: not a safetensors file but a PyTorch zip checkpoint; rename it to .bin to read it "
            "(it is then loaded with torch.load(weights_only=True))"
        )
    if kind == "safetensors" or (kind == "other" and named_safetensors):
        return _SafetensorsShard(path)
    return _TorchShard(path)
