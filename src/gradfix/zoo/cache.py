"""The zoo's cache: content-addressed artifacts, built atomically, reused when complete.

Layout under the cache root (``$GRADFIX_CACHE``, else ``$XDG_CACHE_HOME/gradfix``, else
``~/.cache/gradfix``)::

    artifacts/<name>-<key>/      one built thing (a model folder, data splits), with gradfix.json
    <scenario>/                  a view: relative symlinks to its artifacts, and manifest.json

An artifact's ``key`` is a hash of its name, kind, recipe (every setting that decides its
content) and the keys of the artifacts it is built from; changing a setting gives a new folder
instead of a stale one. An artifact is built in a temporary folder beside its final place and
renamed only once complete, so an interrupted build leaves nothing half-written behind: the next
build starts that artifact again and reuses every one that was finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from gradfix.cache_paths import ENV_VAR as ENV_VAR  # re-exported: the zoo's public names
from gradfix.cache_paths import cache_root as cache_root
from gradfix.errors import ConfigError
from gradfix.io import atomic_output_dir

RECORD_FILE = "gradfix.json"  # like every folder gradfix writes; never copied into derived models
ARTIFACTS = "artifacts"
_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "scikit-learn", "tqdm")

BuildFn = Callable[[Path, Mapping[str, Path], bool], Mapping[str, Any]]
"""``build(folder, dependency folders by role, progress) -> details``: fills ``folder`` and returns
what to record about the build (counts, losses); ``progress`` shows progress bars."""


def package_versions() -> dict[str, str]:
    """Versions of Python, gradfix and the libraries that shape a build (missing ones left out)."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("gradfix", *_PACKAGES):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def installed(distribution: str) -> str:
    """``name==version`` of an installed distribution, or ``name (not installed)``: for recipes."""
    try:
        return f"{distribution}=={metadata.version(distribution)}"
    except metadata.PackageNotFoundError:
        return f"{distribution} (not installed)"


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True, eq=False)
class Artifact:
    """One cached thing: ``build`` fills a folder from the folders of ``deps``.

    ``name`` is a relative path (``text/B-short``); ``recipe`` holds every setting that decides
    the content and must be JSON-serialisable. Equal name, kind, recipe and dependencies give the
    same :meth:`key`, hence the same folder.
    """

    name: str
    kind: str
    recipe: Mapping[str, Any]
    build: BuildFn
    deps: Mapping[str, Artifact] = field(default_factory=dict)
    summary: str = ""

    def key(self) -> str:
        """12 hex digits identifying the artifact's content."""
        spec = {
            "name": self.name,
            "kind": self.kind,
            "recipe": self.recipe,
            "deps": {role: dep.key() for role, dep in sorted(self.deps.items())},
        }
        return hashlib.sha256(_canonical(spec).encode()).hexdigest()[:12]

    def folder(self, root: Path) -> Path:
        """Where the artifact lives under the cache ``root``."""
        return root / ARTIFACTS / f"{self.name}-{self.key()}"

    def is_built(self, root: Path) -> bool:
        """Whether the complete artifact is in the cache (its folder and record exist)."""
        return (self.folder(root) / RECORD_FILE).is_file()

    def record(self, root: Path) -> dict[str, Any]:
        """The artifact's record (``gradfix.json``)."""
        return json.loads((self.folder(root) / RECORD_FILE).read_text(encoding="utf-8"))


def folder_size(path: Path) -> int:
    """Bytes of the regular files under ``path`` (symlinks not followed)."""
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _remove_stale_temporaries(dest: Path) -> None:
    """Delete temporary folders that an interrupted build of ``dest`` left beside it."""
    if dest.parent.is_dir():
        for stale in dest.parent.glob(f".{dest.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def build_lock(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on the cache while building (so two builds do not race).

    Uses ``fcntl.flock`` where available; elsewhere builds are not serialised.
    """
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(root / ".build.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"waiting for another gradfix zoo build in {root} ...", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure(artifact: Artifact, root: Path, log: Callable[[str], None] = print, progress: bool = True) -> Path:
    """The folder of ``artifact`` under ``root``, building it (and its dependencies) if needed.

    A complete artifact is reused as it is. Otherwise any leftovers of an interrupted build are
    removed, the artifact is built in a temporary folder, its ``gradfix.json`` (name, key,
    recipe, dependencies, package versions, wall time) is written, and the folder is renamed
    into place. Call under :func:`build_lock` when several processes may share the cache.
    """
    dest = artifact.folder(root)
    if artifact.is_built(root):
        return dest
    deps = {role: ensure(dep, root, log, progress) for role, dep in artifact.deps.items()}
    if dest.exists():  # a folder without its record is not ours to trust
        raise ConfigError(f"{dest}: exists but has no {RECORD_FILE}; delete it and build again")
    _remove_stale_temporaries(dest)
    log(f"building {artifact.name} ({artifact.summary or artifact.kind}) ...")
    start = time.perf_counter()
    with atomic_output_dir(dest) as tmp:
        details = dict(artifact.build(tmp, deps, progress))
        seconds = round(time.perf_counter() - start, 1)
        record = {
            "name": artifact.name,
            "kind": artifact.kind,
            "key": artifact.key(),
            "summary": artifact.summary,
            "recipe": artifact.recipe,
            "deps": {role: f"{dep.name}-{dep.key()}" for role, dep in artifact.deps.items()},
            "details": details,
            "wall_seconds": seconds,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": package_versions(),
            "torch_threads": _torch_threads(),
        }
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    log(f"built {artifact.name} in {seconds:.0f} s")
    return dest


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def link_view(view: Path, entries: Mapping[str, Path]) -> None:
    """Make ``view/<entry>`` a relative symlink to each artifact folder, replacing older links."""
    view.mkdir(parents=True, exist_ok=True)
    for entry, target in entries.items():
        link = view / entry
        link.parent.mkdir(parents=True, exist_ok=True)
        relative = os.path.relpath(target, link.parent)
        if link.is_symlink() or link.exists():
            if link.is_symlink() and os.readlink(link) == relative:
                continue
            if link.is_dir() and not link.is_symlink():
                raise ConfigError(f"{link}: a real folder where the zoo expects a link; remove it")
            link.unlink()
        tmp = link.with_name(f".{link.name}.link-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(relative, tmp, target_is_directory=True)
        os.replace(tmp, link)


def write_json_atomic(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON to ``path`` via a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
