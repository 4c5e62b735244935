"""Output folders and files that appear only when complete, and never over an input.

:func:`atomic_output_dir` / :func:`atomic_output_file` build an output under a temporary name
beside its destination and move it into place when the block succeeds; on any failure (an
exception, a full disk, Ctrl-C) the temporary is removed and an existing output is untouched.
:func:`check_output_free` and :func:`check_output_not_input` refuse outputs that would replace
existing results or inputs, before any long work starts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from gradfix.errors import ConfigError, GradfixError, OutputError
from gradfix.io.paths import check_not_over, os_reason, path_exists, path_stat
from gradfix.io.writer import WRITE_ERRORS


def _exists(path: Path) -> bool:
    """Whether anything is at ``path``; a path that cannot be looked at counts as absent."""
    try:
        return path_exists(path)
    except ConfigError:
        return False


def check_output_free(dest: str | Path, overwrite: bool = False) -> None:
    """Raise ConfigError if ``dest`` exists and ``overwrite`` is false (call before long work).

    The current folder, or a folder above it, is never replaced. A path that cannot be looked at
    (a name too long, no permission) is a ConfigError naming it.
    """
    dest = Path(dest)
    exists = path_exists(dest)
    if exists and not overwrite:
        raise ConfigError(f"{dest}: output already exists; pass --overwrite to replace it")
    if exists:
        here, real = Path.cwd().resolve(), dest.resolve()
        if real == here or real in here.parents:
            raise ConfigError(f"{dest}: is the current folder or a folder above it; choose another output")


def _make_parents(parent: Path) -> list[Path]:
    """Create ``parent`` and its missing ancestors; return those created, deepest first."""
    created = []
    probe = parent
    while not probe.exists() and probe != probe.parent:
        created.append(probe)
        probe = probe.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{parent}: cannot create the output's folder ({os_reason(exc)})") from exc
    return created


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _replace(tmp: Path, dest: Path, parent: Path) -> None:
    """Move the finished ``tmp`` onto the existing ``dest``; on any failure ``dest`` is as it was.

    The old ``dest`` is first moved aside into a hidden folder, removed once ``tmp`` is in place
    (or moved back if that fails). The hidden folder is removed in every case but one: when the
    old output could not be moved back, it stays there rather than being deleted.
    """
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=parent))
    try:
        os.replace(dest, old / "previous")
    except BaseException:
        _remove_empty([old])
        raise
    try:
        os.replace(tmp, dest)
    except BaseException:
        os.replace(old / "previous", dest)
        _remove_empty([old])
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(dest: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build an output folder under a temporary name and move it into place on success.

    Yields a fresh hidden folder beside ``dest``. On normal exit it becomes ``dest`` (an
    existing ``dest`` is replaced only when ``overwrite`` is true). If the block raises, the
    temporary folder is deleted (with any parent folders this call created) and any existing
    ``dest`` is left untouched. A failure to write (an :class:`OutputError` from the block, or an
    ``OSError`` such as a full disk) is raised as an :class:`OutputError` naming ``dest``.
    """
    dest = Path(dest)
    check_output_free(dest, overwrite)
    parent = dest.absolute().parent
    created = _make_parents(parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=parent))
    except OSError as exc:
        _remove_empty(created)
        raise OutputError(f"{dest}: cannot create a temporary folder beside it ({os_reason(exc)})") from exc
    try:
        # mkdtemp makes the folder private (0700); the finished output should be readable.
        tmp.chmod(0o755)
        yield tmp
        if _exists(dest):
            if not overwrite:
                raise ConfigError(f"{dest}: output already exists; pass --overwrite to replace it")
            _replace(tmp, dest, parent)
        else:
            os.replace(tmp, dest)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        if isinstance(exc, OutputError) or (isinstance(exc, OSError) and not isinstance(exc, GradfixError)):
            detail = str(exc) if isinstance(exc, OutputError) else f"cannot write it ({os_reason(exc)})"
            kept = "; the existing output is unchanged" if _exists(dest) else ""
            raise OutputError(f"{dest}: {detail}; nothing was written{kept}") from exc
        raise


@contextlib.contextmanager
def atomic_output_file(dest: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Write one file under a temporary name beside ``dest`` and move it into place on success.

    Yields the temporary path to write. An existing ``dest`` is refused unless ``overwrite``; if
    the block raises, the temporary file is removed and ``dest`` is left as it was.
    """
    dest = Path(dest)
    check_output_free(dest, overwrite)
    if dest.is_dir():
        raise ConfigError(f"{dest}: is a folder, not a file")
    parent = dest.absolute().parent
    created = _make_parents(parent)
    try:
        handle, name = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=parent)
        os.close(handle)
    except OSError as exc:
        _remove_empty(created)
        raise OutputError(f"{dest}: cannot create a temporary file beside it ({os_reason(exc)})") from exc
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        _remove_empty(created)
        if isinstance(exc, WRITE_ERRORS) and not isinstance(exc, GradfixError):
            reason = os_reason(exc)
            raise OutputError(f"{dest}: cannot write the file ({reason}); nothing was written") from exc
        raise


def check_output_not_input(
    dest: str | Path, inputs: Iterable[str | Path], *, compare_files: bool = True
) -> None:
    """Raise ConfigError if ``dest`` is, lies inside or contains any of ``inputs`` or their files.

    Paths are compared once resolved (``..`` and symlinks), then (unless ``compare_files`` is
    false) by device and inode with every file each input contributes
    (:func:`gradfix.io.paths.check_not_over`): an output that would replace or contain a file an
    input links to (a Hub snapshot's blob) is refused too. Every path is looked at first, so one
    that cannot be used is named before anything else.
    """
    given = list(inputs)
    for path in (dest, *given):
        path_stat(Path(path).expanduser())
    out = Path(dest).expanduser().resolve()
    for one in given:
        inp = Path(one).expanduser().resolve()
        if out == inp:
            raise ConfigError(f"output {dest} is the same path as input {one}")
        if inp in out.parents:
            raise ConfigError(f"output {dest} lies inside input {one}")
        if out in inp.parents:
            raise ConfigError(f"output {dest} contains input {one}")
    if compare_files:
        check_not_over(dest, given)
