"""The zoo's cache: where it lives, atomic artifacts, reuse, resuming an interrupted build, views."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gradfix.errors import ConfigError
from gradfix.zoo import ENV_VAR, cache_root
from gradfix.zoo.cache import RECORD_FILE, Artifact, ensure, link_view
from gradfix.zoo.scenario import MANIFEST, Scenario, build_scenario, scenario_status


class Counter:
    """A build function that writes one file and counts its calls; it can be told to fail."""

    def __init__(self, text: str = "x", fail: bool = False):
        self.calls = 0
        self.text = text
        self.fail = fail

    def __call__(self, out: Path, deps: dict[str, Path], progress: bool) -> dict[str, object]:
        self.calls += 1
        (out / "value.txt").write_text(
            self.text + "".join((d / "value.txt").read_text() for d in deps.values())
        )
        if self.fail:
            raise KeyboardInterrupt  # an interrupted build
        return {"deps": sorted(deps)}


def test_cache_root_env_override_and_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "given") == tmp_path / "given"
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "gradfix"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "gradfix"


def test_key_depends_on_recipe_and_dependencies() -> None:
    build = Counter()
    dep1 = Artifact("d", "data", {"seed": 0}, build)
    dep2 = Artifact("d", "data", {"seed": 1}, build)
    a = Artifact("m", "model", {"lr": 1}, build, deps={"data": dep1})
    assert a.key() == Artifact("m", "model", {"lr": 1}, Counter(), deps={"data": dep1}).key()
    assert a.key() != Artifact("m", "model", {"lr": 2}, build, deps={"data": dep1}).key()
    assert a.key() != Artifact("m", "model", {"lr": 1}, build, deps={"data": dep2}).key()


def test_artifact_is_built_once_and_reused(tmp_path: Path) -> None:
    build = Counter("a")
    artifact = Artifact("family/a", "data", {"seed": 0}, build)
    folder = ensure(artifact, tmp_path, log=lambda m: None)
    assert folder == artifact.folder(tmp_path)
    assert (folder / "value.txt").read_text() == "a"
    record = json.loads((folder / RECORD_FILE).read_text())
    assert record["recipe"] == {"seed": 0} and record["key"] == artifact.key()
    assert "wall_seconds" in record and "torch" in record["versions"]
    ensure(artifact, tmp_path, log=lambda m: None)
    assert build.calls == 1


def test_interrupted_build_leaves_nothing_and_resumes(tmp_path: Path) -> None:
    first = Counter("1")
    second = Counter("2", fail=True)
    dep = Artifact("f/first", "data", {}, first)
    top = Artifact("f/second", "model", {}, second, deps={"data": dep})
    with pytest.raises(KeyboardInterrupt):
        ensure(top, tmp_path, log=lambda m: None)
    assert dep.is_built(tmp_path) and not top.is_built(tmp_path)
    leftovers = [p for p in (tmp_path / "artifacts" / "f").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    # a build killed without cleanup leaves a temporary folder: the next build removes it
    stale = top.folder(tmp_path).parent / f".{top.folder(tmp_path).name}.tmp-killed"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"\0")
    second.fail = False
    folder = ensure(top, tmp_path, log=lambda m: None)
    assert (folder / "value.txt").read_text() == "21"
    assert first.calls == 1 and second.calls == 2
    assert not stale.exists()


def test_folder_without_record_is_refused(tmp_path: Path) -> None:
    artifact = Artifact("x", "data", {}, Counter())
    artifact.folder(tmp_path).mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"no gradfix\.json"):
        ensure(artifact, tmp_path, log=lambda m: None)


def test_view_links_are_relative_and_replaced(tmp_path: Path) -> None:
    a, b = tmp_path / "artifacts" / "a", tmp_path / "artifacts" / "b"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    view = tmp_path / "scenario"
    link_view(view, {"A": a, "ft/task": b})
    assert not os.path.isabs(os.readlink(view / "A"))
    assert (view / "ft" / "task").resolve() == b.resolve()
    link_view(view, {"A": b})
    assert (view / "A").resolve() == b.resolve()


def _scenario() -> Scenario:
    data = Artifact("s/data", "data", {}, Counter("d"))
    base = Artifact("s/A", "model", {}, Counter("a"))
    entries = {
        "data": data,
        "A": base,
        "A-ft/one": Artifact(
            "s/A-ft/one", "finetune", {"t": 1}, Counter("1"), deps={"base": base, "data": data}
        ),
        "A-ft/two": Artifact(
            "s/A-ft/two", "finetune", {"t": 2}, Counter("2"), deps={"base": base, "data": data}
        ),
    }
    return Scenario("toy", "test", "a toy scenario", entries, tasks=("one", "two"))


def test_build_scenario_partial_then_complete(tmp_path: Path) -> None:
    scenario = _scenario()
    assert scenario_status(scenario, tmp_path)["state"] == "missing"
    view = build_scenario(scenario, tmp_path, tasks=["one"], log=lambda m: None, progress=False)
    assert view == tmp_path / "toy"
    assert (view / "A-ft" / "one" / "value.txt").read_text() == "1ad"
    assert not (view / "A-ft" / "two").exists()
    status = scenario_status(scenario, tmp_path)
    assert status["state"] == "partial" and status["built"] == 3 and status["bytes"] > 0
    manifest = json.loads((view / MANIFEST).read_text())
    assert manifest["state"] == "partial" and manifest["entries"]["A-ft/two"]["built"] is False
    build_scenario(scenario, tmp_path, log=lambda m: None, progress=False)
    manifest = json.loads((view / MANIFEST).read_text())
    assert manifest["state"] == "complete"
    assert set(manifest["build_seconds"]) == {"data", "A", "A-ft/one", "A-ft/two"}
    with pytest.raises(ConfigError, match="unknown task"):
        scenario.select(["three"])
