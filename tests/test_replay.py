"""``gradfix.yaml`` replays a job: ``--config out/gradfix.yaml --out other/`` writes the same weights.

Every output folder holds the job's options as a ``--config`` file (inputs as absolute paths, no
``out`` or ``overwrite``); ``gradfix.json`` stands for the same options. Checked here for the
default (adaptive) transport run through the Python API, the published GradFix with sharded
output through the command line, and a masked merge replayed from its ``gradfix.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_checks import file_hashes, one_error_line, transport_args, transport_models

from gradfix.cli.main import main
from gradfix.jobs import MaskSettings, VoteSettings, transport_checkpoints


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return transport_models(tmp_path_factory.mktemp("replay"))


def _weights(folder: Path) -> dict[str, str]:
    """The sha256 of every weight file of ``folder``, by file name."""
    return {Path(k).name: v for k, v in file_hashes(*sorted(folder.glob("*.safetensors"))).items()}


def _replay(out: Path, other: Path, command: str = "transport", name: str = "gradfix.yaml") -> None:
    assert main([command, "--config", str(out / name), "--out", str(other), "--json"]) == 0


def _options(out: Path) -> dict[str, Any]:
    text = (out / "gradfix.yaml").read_text()
    assert text.startswith("# "), text[:200]  # says how to replay it
    options = yaml.safe_load(text)
    assert options == json.loads((out / "gradfix.json").read_text())["options"]
    assert not {"out", "overwrite", "votes_out", "json"} & set(options)
    return options


def test_default_transport_from_the_api_replays_from_the_command_line(models, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(models["A"].parent)  # relative inputs, as a user in that folder gives them
    out = tmp_path / "api"
    votes = VoteSettings(data="few.jsonl", progress=False)
    grids = MaskSettings(exclude=["pooler.*"], thresholds=[0.0, "naive"], alphas=[0.0, 1.0, 2.0])
    transport_checkpoints("A", "A-ft", "B", out, votes, grids)  # the default method: adaptive
    options = _options(out)
    assert options["method"] == "adaptive" and options["alpha"] is None and options["mask"] is None
    assert options["thresholds"] == [0.0, "naive"] and options["alphas"] == [0.0, 1.0, 2.0]
    for key in ("source_base", "source_finetuned", "target_base", "data"):
        assert Path(options[key]).is_absolute() and Path(options[key]).exists(), key
    assert options["exclude"] == ["pooler.*"] and options["shard_size"] == "2GiB"
    monkeypatch.chdir(tmp_path)
    _replay(out, tmp_path / "replayed")
    first = _weights(out)
    assert set(first) == {"model.safetensors", "zero_shot_head.safetensors"}
    assert _weights(tmp_path / "replayed") == first
    chosen = json.loads((tmp_path / "replayed" / "gradfix.json").read_text())["choice"]
    assert chosen == json.loads((out / "gradfix.json").read_text())["choice"]


def test_gradfix_with_shards_replays(models, tmp_path) -> None:
    out = tmp_path / "gradfix"
    extra = ("--method", "gradfix", "--mask", "agreement", "--alpha", "1.5", "--seed", "3")
    extra += ("--shard-size", "40KB", "--votes-out", str(tmp_path / "votes.safetensors"))
    assert main(transport_args(models, out, *extra)) == 0
    first = _weights(out)
    assert len([n for n in first if n.startswith("model-")]) > 1  # sharded
    options = _options(out)
    assert options["shard_size"] == 40_000 and options["seed"] == 3 and options["alpha"] == 1.5
    assert options["method"] == "gradfix" and options["mask"] == "agreement"
    _replay(out, tmp_path / "from-yaml")
    assert _weights(tmp_path / "from-yaml") == first
    assert (tmp_path / "from-yaml" / "gradfix.yaml").read_text() == (out / "gradfix.yaml").read_text()


def test_merge_replays_from_its_gradfix_json_too(models, tmp_path) -> None:
    out = tmp_path / "merged"
    sources = ["--source-base", str(models["A"]), "--data", str(models["few"])]
    for finetuned in (models["A-ft"], models["A"].parent / "A-ft"):
        sources += ["--source-finetuned", str(finetuned)]
    common = ["--target-base", str(models["B"]), "--pipeline", "mask-then-merge", "--density", "0.5"]
    common += ["--exclude", "pooler.*", "--no-progress"]
    assert main(["merge", *sources, *common, "--out", str(out)]) == 0
    options = yaml.safe_load((out / "gradfix.yaml").read_text())
    assert [t["data"] for t in options["tasks"]] == [str(models["few"])] * 2
    assert options["pipeline"] == "mask-then-merge" and options["density"] == 0.5
    assert not {"out", "overwrite", "source_finetuned", "data"} & set(options)
    _replay(out, tmp_path / "again", "merge", name="gradfix.json")  # the record stands for its options
    assert _weights(tmp_path / "again") == _weights(out)
    assert (tmp_path / "again" / "gradfix.yaml").read_text() == (out / "gradfix.yaml").read_text()


def test_gradfix_json_of_another_command_or_without_options_is_one_line(models, tmp_path, capsys) -> None:
    record = tmp_path / "merge-out" / "gradfix.json"
    record.parent.mkdir()
    record.write_text(json.dumps({"command": "merge", "gradfix_version": "0", "options": {}}))
    line = one_error_line(["transport", "--config", str(record), "--out", str(tmp_path / "o")], capsys)
    assert "record of a gradfix merge run" in line and f"gradfix merge --config {record}" in line
    record.write_text(json.dumps({"command": "transport", "gradfix_version": "0", "inputs": {}}))
    line = one_error_line(["transport", "--config", str(record), "--out", str(tmp_path / "o")], capsys)
    assert "holds no options to replay" in line and "gradfix.yaml" in line
    assert not (tmp_path / "o").exists()
