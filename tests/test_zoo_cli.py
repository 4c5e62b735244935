"""``gradfix zoo list | build | path`` through their argument parser and handlers, on a toy scenario."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import gradfix.zoo as zoo
from gradfix.cli.zoo_cmd import add_zoo_parser
from gradfix.errors import ConfigError
from gradfix.zoo.cache import Artifact
from gradfix.zoo.scenario import Scenario


def _write(text: str):
    def build(out: Path, deps: dict[str, Path], progress: bool) -> dict[str, object]:
        (out / "value.txt").write_text(text * 100)
        return {"progress": progress}

    return build


def _toy() -> Scenario:
    data = Artifact("toy/data", "data", {"n": 1}, _write("d"))
    base = Artifact("toy/A", "model", {"n": 2}, _write("a"))
    ft = Artifact("toy/A-ft/t", "finetune", {"n": 3}, _write("f"), deps={"base": base, "data": data})
    return Scenario("toy", "test", "a toy scenario", {"data": data, "A": base, "A-ft/t": ft}, tasks=("t",))


@pytest.fixture()
def parser(monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    monkeypatch.setitem(zoo.SCENARIOS, "toy", _toy)
    p = argparse.ArgumentParser(prog="gradfix")
    sub = p.add_subparsers(dest="command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--config")
        q.add_argument("--json", action="store_true", default=False)

    add_zoo_parser(sub, common)
    return p


def _run(parser: argparse.ArgumentParser, *argv: str) -> dict:
    args = parser.parse_args(list(argv))
    return args.handler(args)


def test_list_build_path(
    parser: argparse.ArgumentParser, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cache = str(tmp_path / "cache")
    listed = _run(parser, "zoo", "list", "--cache", cache)
    names = [row["name"] for row in listed["scenarios"]]
    assert {"text-release-short", "text-release-long", "vision-independent", "toy"} <= set(names)
    toy = next(row for row in listed["scenarios"] if row["name"] == "toy")
    assert toy["state"] == "missing" and toy["bytes"] == 0
    out = capsys.readouterr().out
    assert "toy" in out and "missing" in out and cache in out

    built = _run(parser, "zoo", "build", "toy", "--cache", cache, "--no-progress")
    assert built["state"] == "complete" and Path(built["path"]) == tmp_path / "cache" / "toy"
    assert (Path(built["path"]) / "A-ft" / "t" / "value.txt").read_text() == "f" * 100
    manifest = json.loads((Path(built["path"]) / zoo.MANIFEST).read_text())
    assert manifest["entries"]["A-ft/t"]["details"] == {"progress": False}

    listed = _run(parser, "zoo", "list", "--cache", cache, "--json")
    toy = next(row for row in listed["scenarios"] if row["name"] == "toy")
    assert toy["state"] == "complete" and toy["bytes"] > 300  # the files and their records

    capsys.readouterr()
    located = _run(parser, "zoo", "path", "toy", "--cache", cache)
    assert capsys.readouterr().out.strip() == str(tmp_path / "cache" / "toy") == located["path"]


def test_cache_from_environment(parser: argparse.ArgumentParser, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(zoo.ENV_VAR, str(tmp_path / "env"))
    located = _run(parser, "zoo", "path", "toy", "--json")
    assert located["path"] == str(tmp_path / "env" / "toy") and located["state"] == "missing"


def test_partial_build_and_unknown_names(parser: argparse.ArgumentParser, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    with pytest.raises(ConfigError, match="unknown scenario"):
        _run(parser, "zoo", "build", "nope", "--cache", cache)
    with pytest.raises(ConfigError, match="unknown task"):
        _run(parser, "zoo", "build", "toy", "--task", "other", "--cache", cache)
    result = _run(parser, "zoo", "build", "toy", "--task", "t", "--cache", cache, "--json")
    assert result["state"] == "complete"


def test_registered_scenarios_describe_themselves() -> None:
    for name in ("text-release-short", "text-release-long", "vision-independent"):
        scenario = zoo.get_scenario(name)
        assert scenario.name == name and scenario.real and scenario.built and len(scenario.tasks) >= 3
        assert {"A", "B", "data"} <= set(scenario.entries)
        assert all(f"B-ft/{task}" in scenario.entries for task in scenario.tasks)
    short, long = zoo.get_scenario("text-release-short"), zoo.get_scenario("text-release-long")
    assert short.entries["A-ft/headlines"].key() == long.entries["A-ft/headlines"].key()
    assert short.entries["B"].key() != long.entries["B"].key()
