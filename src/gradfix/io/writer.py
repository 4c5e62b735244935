"""Writing checkpoints: in-memory state dicts to sharded safetensors, hashing, copying model files.

:func:`save_state_dict` is a thin front to :class:`gradfix.io.streaming.StreamingShardedWriter`,
which alone plans, names and indexes the shards. :func:`sort_safetensors_metadata` puts in order
the header of a file written by ``safetensors`` itself (votes files, zero-shot heads).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError

from gradfix.errors import CheckpointError, ConfigError, OutputError
from gradfix.io.paths import allowed_roots, check_inside, folder_files, open_regular, os_reason, path_stat
from gradfix.io.streaming import StreamingShardedWriter, TensorPlan
from gradfix.settings import DEFAULT_SHARD_BYTES

WRITE_ERRORS = (OSError, SafetensorError)
"""Exception types a failed write can raise (``save_file`` reports a full disk as SafetensorError)."""

# Files that copy_model_files leaves behind: weights in any common format, shard indexes and
# gradfix's own provenance record and replay options.
_SKIPPED_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json",
    ".h5", ".msgpack", ".onnx", ".gguf",
)  # fmt: skip
_SKIPPED_NAMES = ("gradfix.json", "gradfix.yaml")


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


_CHUNK_BYTES = 64 * 2**20
"""Largest slice of a tensor that :func:`save_state_dict` copies (to the CPU, to bytes) at a time."""


def _row_chunks(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """Detached CPU slices of ``tensor`` along its first dimension, about ``_CHUNK_BYTES`` each."""
    data = tensor.detach()
    if data.dim() == 0 or data.numel() == 0:
        yield data.to("cpu")
        return
    row_bytes = max(1, data[0].numel() * data.element_size())
    step = max(1, _CHUNK_BYTES // row_bytes)
    for start in range(0, data.shape[0], step):
        yield data[start : start + step].to("cpu")


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write ``state_dict`` into ``out_dir`` (created if missing) as Hugging Face safetensors.

    The tensors, in the mapping's order, go through :class:`StreamingShardedWriter`: shards of at
    most ``max_shard_bytes`` (a larger tensor alone), named ``model.safetensors`` when there is
    one and ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json`` otherwise;
    every header's metadata is ``{"format": "pt", **metadata}``, sorted. The files are
    byte-identical to what the streaming writer gives for the same plan and data. Tensors may live
    on any device, be views, non-contiguous or share storage; each is copied to the CPU in
    slices of at most 64 MiB. Returns the weight files in shard order.
    """
    plan = []
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor '{name}': expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.layout != torch.strided:
            raise ValueError(f"tensor '{name}': only dense tensors can be saved ({tensor.layout})")
        plan.append(TensorPlan(name, tensor.dtype, tuple(tensor.shape)))
    out = Path(out_dir)
    writer = StreamingShardedWriter(out, plan, max_shard_bytes, metadata)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the output folder ({os_reason(exc)})") from exc
    try:
        for name, tensor in state_dict.items():
            for chunk in _row_chunks(tensor):
                writer.write(name, chunk)
    except BaseException:
        writer.abort()  # partial files are left for the caller's atomic output folder to discard
        raise
    return writer.close()


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a regular file, read in 1 MiB blocks.

    A FIFO, a device (``/dev/zero``) or a socket is refused without reading it (it could block or
    never end); any failure to read is a :class:`CheckpointError` naming the file.
    """
    digest = hashlib.sha256()
    try:
        with open_regular(path) as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read file for hashing ({os_reason(exc)})") from exc
    return digest.hexdigest()


def _is_model_file(name: str) -> bool:
    lower = name.lower()
    return not (name.startswith(".") or lower.endswith(_SKIPPED_SUFFIXES) or lower in _SKIPPED_NAMES)


def list_model_files(src_dir: str | Path) -> list[Path]:
    """The non-weight files of a model folder (config, tokenizer, ...) that ``copy_model_files`` copies.

    Weight files, shard indexes, ``gradfix.json``, ``gradfix.yaml`` and hidden files or folders are
    left out. The paths are sorted and relative to ``src_dir``; a file ``src_dir`` has none. Every
    file listed passes :func:`gradfix.io.paths.check_inside`: a symlink that leaves the folder (or,
    for a Hub snapshot, the cache's ``blobs/``) or anything but a regular file is a
    :class:`CheckpointError`.
    """
    src = Path(src_dir)
    info = path_stat(src)
    if info is None:
        raise CheckpointError(f"{src}: no such model folder")
    if not stat.S_ISDIR(info.st_mode):
        return []
    roots = allowed_roots(src)
    found = [f.relative_to(src) for f in folder_files(src) if _is_model_file(f.name)]
    for rel in found:
        check_inside(src, src / rel, roots)
    return found


_WRITE_ERRNOS = {getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EROFS", "EFBIG") if hasattr(errno, n)}


def copy_model_files(src_dir: str | Path, dst_dir: str | Path, skip: Collection[str] = ()) -> list[str]:
    """Copy the non-weight files of a model folder (config, tokenizer, ...) recursively.

    Weight files, shard indexes, ``gradfix.json``, ``gradfix.yaml``, hidden files or folders and
    the paths in ``skip`` (relative to the folder, compared without case: e.g. ``README.md``, the
    folder's model card) are skipped;
    symlinks are copied as the files they point to, but only when they stay inside the folder (or,
    for a Hub snapshot, the cache's ``blobs/``) and lead to a regular file: anything else is
    refused before the first copy (:func:`list_model_files`). Returns the copied paths relative to
    ``src_dir``, using ``/``. A file ``src_dir`` copies nothing.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    skipped = {PurePosixPath(p).as_posix().lower() for p in skip}
    files = [rel for rel in list_model_files(src) if rel.as_posix().lower() not in skipped]
    if not files:
        return []
    if os.path.realpath(src) == os.path.realpath(dst):
        raise ConfigError(f"{dst}: cannot copy model files onto their own folder")
    copied: list[str] = []
    for rel in files:
        source, target = src / rel, dst / rel
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)  # list_model_files checked it is a regular file in the folder
        except OSError as exc:
            if exc.errno in _WRITE_ERRNOS:
                raise OutputError(f"cannot copy {source} ({os_reason(exc)})") from exc
            raise CheckpointError(f"{source}: cannot copy ({os_reason(exc)})") from exc
        copied.append(rel.as_posix())
    return copied
