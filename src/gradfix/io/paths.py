"""What a user path resolves to, and which files a model folder may hand over.

- :func:`path_stat` / :func:`path_exists`: ``stat`` a user path, with every ``OSError`` other
  than "does not exist" (a name too long, no permission, a loop of links) raised as one line
  naming the path and the reason;
- :func:`check_inside`: a file of a model folder must stay inside the folder (for a Hugging Face
  Hub snapshot, ``snapshots/<rev>/``, inside the cache's ``blobs/`` too) and be a regular file;
- :func:`resolved_files`: every file an input contributes, keyed by device and inode, so that an
  output can be compared with the files its inputs really are (:func:`check_not_over`);
- :func:`open_regular`: open a file for reading only if it is a regular file (a FIFO, ``/dev/zero``
  or a socket would hang or never end).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from gradfix.errors import CheckpointError, ConfigError

FileId = tuple[int, int]
"""``(st_dev, st_ino)``: one file, whatever path or link leads to it."""

_ABSENT = {errno.ENOENT, errno.ENOTDIR}


def os_reason(exc: BaseException) -> str:
    """Short, one-line reason of an I/O failure (``strerror`` when there is one)."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())[:200]


def path_stat(path: str | Path, follow: bool = True) -> os.stat_result | None:
    """``stat`` of ``path`` (``lstat`` unless ``follow``), or None when it does not exist.

    Any other ``OSError`` (a component over 255 bytes, no permission, a loop of symlinks) is a
    :class:`ConfigError` naming the path and the reason.
    """
    try:
        return os.stat(path, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in _ABSENT:
            return None
        if exc.errno == errno.ELOOP and follow:
            raise ConfigError(f"{path}: cannot use this path (a loop of symbolic links)") from exc
        raise ConfigError(f"{path}: cannot use this path ({os_reason(exc)})") from exc


def path_exists(path: str | Path) -> bool:
    """Whether anything (a dangling symlink included) is at ``path``; other failures: ConfigError."""
    return path_stat(path, follow=False) is not None


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _hub_blobs(folder: Path) -> Path | None:
    """The cache's ``blobs/`` folder when ``folder`` is a Hub snapshot (``<repo>/snapshots/<rev>``)."""
    if folder.parent.name != "snapshots":
        return None
    blobs = folder.parent.parent / "blobs"
    info = path_stat(blobs)
    return blobs if info is not None and stat.S_ISDIR(info.st_mode) else None


def allowed_roots(folder: str | Path) -> list[Path]:
    """The real folders files of ``folder`` may resolve into: itself, and a Hub cache's ``blobs/``."""
    real = Path(os.path.realpath(folder))
    blobs = _hub_blobs(Path(os.path.abspath(folder))) or _hub_blobs(real)
    return [real, *([Path(os.path.realpath(blobs))] if blobs is not None else [])]


def check_inside(folder: str | Path, file: str | Path, roots: list[Path] | None = None) -> os.stat_result:
    """Refuse ``file`` (a path inside ``folder``) unless it resolves inside the folder and is regular.

    A symlink may lead anywhere inside ``folder`` or, when ``folder`` is a Hugging Face Hub snapshot
    (``.../snapshots/<rev>``), into the cache's ``blobs/`` beside ``snapshots/``. Anything else
    (``/etc/passwd``, another model, ``/dev/zero``), and any file that is not a regular file (a
    FIFO, a device, a socket), is a :class:`CheckpointError` naming the file. Returns its ``stat``.
    """
    roots = roots if roots is not None else allowed_roots(folder)
    real = Path(os.path.realpath(file))
    if not any(real == root or root in real.parents for root in roots):
        raise CheckpointError(
            f"{file}: a symbolic link that leaves the model folder {folder} (to {real}); "
            "copy the file into the folder instead"
        )
    info = path_stat(real)
    if info is None:
        raise CheckpointError(f"{file}: no such file (a broken symbolic link?)")
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{file}: {_kind(info.st_mode)}, not a regular file; refusing to read it")
    return info


def folder_files(folder: Path) -> list[Path]:
    """Every file under ``folder``, sorted, hidden files and folders left out (linked folders not entered).

    A folder that cannot be read is a :class:`ConfigError` naming it and the reason.
    """
    found: list[Path] = []
    try:
        for root, dirs, files in os.walk(folder, onerror=_raise):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found.extend(Path(root) / name for name in sorted(files) if not name.startswith("."))
    except OSError as exc:
        where = getattr(exc, "filename", None) or folder
        raise ConfigError(f"{where}: cannot read the folder ({os_reason(exc)})") from exc
    return found


def _raise(exc: OSError) -> None:
    raise exc


def resolved_files(path: str | Path) -> dict[FileId, Path]:
    """Every file ``path`` contributes as an input, keyed by ``(device, inode)``, valued by real path.

    A file is itself, links followed. A folder is every file under it (hidden ones left out), each
    checked with :func:`check_inside`. A missing path gives ``{}`` (the reader reports it later). A
    file input that is not a regular file (a FIFO, a device) is refused.
    """
    path = Path(path).expanduser()
    info = path_stat(path)
    if info is None:
        return {}
    if not stat.S_ISDIR(info.st_mode):
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path}: {_kind(info.st_mode)}, not a regular file")
        return {(info.st_dev, info.st_ino): Path(os.path.realpath(path))}
    roots = allowed_roots(path)
    found: dict[FileId, Path] = {}
    for file in folder_files(path):
        file_info = check_inside(path, file, roots)
        found[(file_info.st_dev, file_info.st_ino)] = Path(os.path.realpath(file))
    return found


def _ids_up_from(real: Path) -> dict[FileId, Path]:
    """``(device, inode)`` of ``real`` and of every folder above it."""
    ids = {}
    for place in (real, *real.parents):
        info = path_stat(place)
        if info is not None:
            ids[(info.st_dev, info.st_ino)] = place
    return ids


def check_not_over(out: str | Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an ``out`` that is, or is a folder above, any file an input resolves to.

    Files are compared by device and inode, so a symlink (a Hub snapshot's link into ``blobs/``), a
    hard link or a second mount of the same folder cannot hide that replacing ``out`` would delete
    an input. Nothing is written or removed.
    """
    info = path_stat(out)
    if info is None:
        return
    out_id = (info.st_dev, info.st_ino)
    for given in inputs:
        for real in resolved_files(given).values():
            if out_id in _ids_up_from(real):
                what = "is" if stat.S_ISREG(info.st_mode) else "contains"
                raise ConfigError(f"output {out} {what} the file {real} of input {given}")


def open_regular(path: str | Path) -> BinaryIO:
    """Open ``path`` for binary reading, refusing anything but a regular file without blocking.

    The file is opened non-blocking (a FIFO with no writer would block ``open`` forever) and
    checked with ``fstat`` on the open descriptor, so a file swapped after a check is caught too.
    ``OSError`` is left to the caller, which knows what the file is for.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise CheckpointError(f"{path}: {_kind(mode)}, not a regular file; refusing to read it")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
