"""Writing checkpoints: sharded safetensors output with sorted headers, hashing, copying model files."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import torch
from safetensors.torch import save_file

try:
    from safetensors import SafetensorError
except ImportError:  # older safetensors releases
    from safetensors._safetensors_rust import SafetensorError

from gradfix.errors import CheckpointError, ConfigError, OutputError

DEFAULT_MAX_SHARD_BYTES = 4 * 2**30
WRITE_ERRORS = (OSError, SafetensorError)
"""Exception types a failed write can raise (``save_file`` reports a full disk as SafetensorError)."""
SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"

# Files that copy_model_files leaves behind: weights in any common format, shard indexes and
# gradfix's own provenance record.
_SKIPPED_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json",
    ".h5", ".msgpack", ".onnx", ".gguf",
)  # fmt: skip
_SKIPPED_NAMES = ("gradfix.json",)


def sort_safetensors_metadata(path: str | Path) -> None:
    """Rewrite a safetensors file's header in place with its ``__metadata__`` keys sorted.

    ``safetensors`` writes the metadata mapping in an arbitrary order that changes from call to
    call; sorting it makes the same tensors and metadata give the same bytes. The header keeps its
    length (the JSON text only changes order), so nothing else in the file moves. A header that
    would not re-serialise to the same length is left as it is.
    """
    with open(path, "r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        raw = handle.read(length)
        header = json.loads(raw)
        meta = header.get("__metadata__") if isinstance(header, dict) else None
        if not isinstance(meta, dict) or len(meta) < 2:
            return
        ordered = {"__metadata__": dict(sorted(meta.items()))}
        ordered.update((k, v) for k, v in header.items() if k != "__metadata__")
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) != len(raw.rstrip(b" ")):
            return
        handle.seek(8)
        handle.write(text + b" " * (length - len(text)))


class ShardedWriter:
    """Stream tensors into safetensors shards, holding at most one shard in memory.

    Tensors are buffered until adding the next one would push the buffer past
    ``max_shard_bytes``; the buffer is then written out as one shard. A tensor larger than
    the limit gets a shard of its own. ``close`` names the result the way Hugging Face does:
    ``model.safetensors`` for a single shard, otherwise ``model-0000i-of-0000n.safetensors``
    plus ``model.safetensors.index.json``. Every file's header metadata is
    ``{"format": "pt", **metadata}``.
    """

    def __init__(
        self,
        out_dir: str | Path,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Prepare to write into ``out_dir`` (created if missing)."""
        if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int):
            raise TypeError(f"max_shard_bytes must be an int, got {type(max_shard_bytes).__name__}")
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        for key, value in (metadata or {}).items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"metadata must map str to str; got {key!r}: {value!r}")
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.metadata: dict[str, str] = {"format": "pt", **(metadata or {})}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._buffer_storages: set[int] = set()
        self._shard_of: dict[str, int] = {}
        self._parts: list[Path] = []
        self._total_bytes = 0
        self._closed = False
        self._result: list[Path] = []

    def __len__(self) -> int:
        """Number of tensors added so far."""
        return len(self._shard_of) + len(self._buffer)

    def _prepare(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Detached, contiguous CPU tensor that shares no storage with the buffer."""
        if tensor.layout != torch.strided:
            raise ValueError(f"tensor '{name}': only dense tensors can be saved ({tensor.layout})")
        out = tensor.detach()
        if out.device.type != "cpu":
            return out.to("cpu").contiguous()
        if not out.is_contiguous():
            return out.contiguous()
        storage = out.untyped_storage()
        nbytes = out.numel() * out.element_size()
        shared = storage.data_ptr() in self._buffer_storages
        if shared or out.storage_offset() != 0 or storage.nbytes() != nbytes:
            out = out.clone()
        return out

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor for writing; may write a shard to disk. Duplicate name: ValueError."""
        if self._closed:
            raise ValueError(f"{self.out_dir}: writer is already closed")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor name must be a non-empty string, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            kind = type(tensor).__name__
            raise TypeError(f"tensor '{name}': expected a torch.Tensor, got {kind}")
        if name in self._buffer or name in self._shard_of:
            raise ValueError(f"tensor '{name}' was added twice")
        prepared = self._prepare(name, tensor)
        nbytes = prepared.numel() * prepared.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = prepared
        self._buffer_bytes += nbytes
        if nbytes:
            self._buffer_storages.add(prepared.untyped_storage().data_ptr())
        if self._buffer_bytes >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        index = len(self._parts)
        part = self.out_dir / f".shard-{index + 1:05d}.safetensors.partial"
        try:
            save_file(self._buffer, str(part), metadata=self.metadata)
            sort_safetensors_metadata(part)
        except WRITE_ERRORS as exc:
            raise OutputError(f"cannot write weight shard {index + 1} ({os_reason(exc)})") from exc
        self._parts.append(part)
        for name in self._buffer:
            self._shard_of[name] = index
        self._total_bytes += self._buffer_bytes
        self._buffer = {}
        self._buffer_bytes = 0
        self._buffer_storages = set()

    def close(self) -> list[Path]:
        """Write what is buffered, give the shards their final names and return their paths.

        With no shard written yet (nothing added), an empty ``model.safetensors`` is written.
        Calling ``close`` again returns the same list.
        """
        if self._closed:
            return list(self._result)
        try:
            self._finish()
        except WRITE_ERRORS as exc:
            raise OutputError(f"cannot finish the weight files ({os_reason(exc)})") from exc
        self._closed = True
        return list(self._result)

    def _finish(self) -> None:
        """Flush the buffer and give the shards their final names (and an index if several)."""
        self._flush()
        if not self._parts:
            save_file({}, str(self.out_dir / SINGLE_FILE_NAME), metadata=self.metadata)
            sort_safetensors_metadata(self.out_dir / SINGLE_FILE_NAME)
            self._result = [self.out_dir / SINGLE_FILE_NAME]
        elif len(self._parts) == 1:
            final = self.out_dir / SINGLE_FILE_NAME
            os.replace(self._parts[0], final)
            self._result = [final]
        else:
            count = len(self._parts)
            finals = [self.out_dir / f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
            for part, final in zip(self._parts, finals, strict=True):
                os.replace(part, final)
            weight_map = {name: finals[i].name for name, i in sorted(self._shard_of.items())}
            index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
            text = json.dumps(index, indent=2) + "\n"
            (self.out_dir / INDEX_FILE_NAME).write_text(text, encoding="utf-8")
            self._result = finals

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            # Leave partial files for the caller's atomic output folder to discard.
            self._buffer = {}
            self._buffer_storages = set()
            self._closed = True


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write ``state_dict`` into ``out_dir`` as (possibly sharded) safetensors files."""
    writer = ShardedWriter(out_dir, max_shard_bytes=max_shard_bytes, metadata=metadata)
    for name, tensor in state_dict.items():
        writer.add(name, tensor)
    return writer.close()


def os_reason(exc: BaseException) -> str:
    """Short, one-line reason of an I/O failure (``strerror`` when there is one)."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())[:200]


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read file for hashing ({exc.strerror})") from exc
    return digest.hexdigest()


def _is_model_file(name: str) -> bool:
    lower = name.lower()
    return not (name.startswith(".") or lower.endswith(_SKIPPED_SUFFIXES) or lower in _SKIPPED_NAMES)


def list_model_files(src_dir: str | Path) -> list[Path]:
    """The non-weight files of a model folder (config, tokenizer, ...) that ``copy_model_files`` copies.

    Weight files, shard indexes, ``gradfix.json`` and hidden files or folders are left out. The
    paths are sorted and relative to ``src_dir``; a file ``src_dir`` has none.
    """
    src = Path(src_dir)
    if src.is_file():
        return []
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such model folder")
    found: list[Path] = []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend((Path(root) / name).relative_to(src) for name in sorted(files) if _is_model_file(name))
    return found


_WRITE_ERRNOS = {getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EROFS", "EFBIG") if hasattr(errno, n)}


def copy_model_files(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copy the non-weight files of a model folder (config, tokenizer, ...) recursively.

    Weight files, shard indexes, ``gradfix.json`` and hidden files or folders are skipped;
    symlinks (as in the Hugging Face cache) are copied as the files they point to. Returns
    the copied paths relative to ``src_dir``, using ``/``. A file ``src_dir`` copies nothing.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    if src.is_file():
        return []
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such model folder")
    if src.resolve() == dst.resolve():
        raise ConfigError(f"{dst}: cannot copy model files onto their own folder")
    copied: list[str] = []
    for rel in list_model_files(src):
        source, target = src / rel, dst / rel
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        except OSError as exc:
            if exc.errno in _WRITE_ERRNOS:
                raise OutputError(f"cannot copy {source} ({os_reason(exc)})") from exc
            raise CheckpointError(f"{source}: cannot copy ({os_reason(exc)})") from exc
        copied.append(rel.as_posix())
    return copied
