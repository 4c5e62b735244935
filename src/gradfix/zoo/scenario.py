"""Scenarios: named sets of artifacts (data, bases A and B, fine-tunes), built into a cache view.

A :class:`Scenario` maps entry names (``A``, ``B``, ``data``, ``A-ft/<task>``, ``B-ft/<task>``)
to :class:`~gradfix.zoo.cache.Artifact` objects. :func:`build_scenario` builds what is missing,
links every entry into ``<cache>/<scenario>/`` and writes ``manifest.json`` there.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradfix.errors import ConfigError
from gradfix.zoo.cache import (
    Artifact,
    build_lock,
    cache_root,
    ensure,
    folder_size,
    link_view,
    package_versions,
    write_json_atomic,
)

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Scenario:
    """A named scenario: its artifacts by entry name, its tasks, and what is real or built."""

    name: str
    family: str
    summary: str
    entries: Mapping[str, Artifact]
    tasks: Sequence[str] = ()
    real: str = ""
    built: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def select(self, tasks: Iterable[str] | None = None) -> dict[str, Artifact]:
        """The entries needed for ``tasks`` (all tasks when ``None``): shared ones plus each task's."""
        if tasks is None:
            return dict(self.entries)
        wanted = list(tasks)
        unknown = [t for t in wanted if t not in self.tasks]
        if unknown:
            raise ConfigError(f"{self.name}: unknown task(s) {unknown}; tasks: {', '.join(self.tasks)}")
        return {
            entry: artifact
            for entry, artifact in self.entries.items()
            if "/" not in entry or entry.split("/", 1)[1] in wanted
        }

    def view(self, root: str | Path | None = None) -> Path:
        """The scenario's folder under the cache root."""
        return cache_root(root) / self.name


def scenario_status(scenario: Scenario, root: str | Path | None = None) -> dict[str, Any]:
    """Which entries are built, with their folders and sizes in bytes (nothing is built)."""
    base = cache_root(root)
    entries: dict[str, dict[str, Any]] = {}
    for entry, artifact in scenario.entries.items():
        folder = artifact.folder(base)
        built = artifact.is_built(base)
        entries[entry] = {"built": built, "folder": str(folder), "bytes": folder_size(folder) if built else 0}
    done = sum(e["built"] for e in entries.values())
    state = "complete" if done == len(entries) else ("partial" if done else "missing")
    return {
        "name": scenario.name,
        "state": state,
        "built": done,
        "total": len(entries),
        "bytes": sum(e["bytes"] for e in entries.values()),
        "path": str(scenario.view(root)),
        "entries": entries,
    }


def build_scenario(
    scenario: Scenario,
    root: str | Path | None = None,
    tasks: Iterable[str] | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> Path:
    """Build (or reuse) the artifacts of ``scenario`` for ``tasks`` and return its view folder.

    Artifacts already in the cache are reused; the others are built in dependency order, each
    atomically, under the cache's lock (a scenario whose artifacts are all built takes no lock, so
    reading it never waits for another build). The view ``<cache>/<name>/`` gets a relative link
    per entry and a ``manifest.json`` with every artifact's recipe, seeds, counts, wall time and
    package versions.
    """
    base = cache_root(root)
    selected = scenario.select(tasks)
    start = time.perf_counter()
    missing = any(not artifact.is_built(base) for artifact in selected.values())
    with build_lock(base) if missing else contextlib.nullcontext():
        folders = {}
        for entry, artifact in selected.items():
            folders[entry] = ensure(artifact, base, log=log, progress=progress)
        view = scenario.view(base)
        link_view(view, folders)
        write_manifest(scenario, base)
    log(f"{scenario.name}: ready in {view} ({time.perf_counter() - start:.0f} s)")
    return view


def write_manifest(scenario: Scenario, root: Path) -> dict[str, Any]:
    """Write ``manifest.json`` into the scenario's view from the records of its built artifacts."""
    status = scenario_status(scenario, root)
    entries: dict[str, Any] = {}
    for entry, artifact in scenario.entries.items():
        if artifact.is_built(root):
            record = artifact.record(root)
            record["folder"] = artifact.folder(root).name
            entries[entry] = record
        else:
            entries[entry] = {"built": False, "name": artifact.name, "key": artifact.key()}
    manifest = {
        "scenario": scenario.name,
        "family": scenario.family,
        "summary": scenario.summary,
        "real": scenario.real,
        "built_here": scenario.built,
        "tasks": list(scenario.tasks),
        "state": status["state"],
        "entries": entries,
        "build_seconds": {
            entry: record.get("wall_seconds") for entry, record in entries.items() if "wall_seconds" in record
        },
        "versions": package_versions(),
        **dict(scenario.extra),
    }
    write_json_atomic(scenario.view(root) / MANIFEST, manifest)
    return manifest
