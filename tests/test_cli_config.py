"""One validated configuration: the command line and ``--config`` YAML accept and refuse the same values.

Every option of ``transport``, ``merge`` and ``eval`` is listed with values that must be accepted
and values that must be refused; each value goes once through the command line (strings) and once
through a YAML mapping, and both must agree on the outcome and on the validated value.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from gradfix import TaskVector
from gradfix.cli.config import flag_of, validated_options
from gradfix.cli.fields import MERGE_UNSUPPORTED_MASKS, command_options
from gradfix.cli.main import main
from gradfix.errors import ConfigError
from gradfix.merge import MERGE_METHODS
from gradfix.methods import METHODS
from gradfix.ops.masks import MASKS
from gradfix.recipes import RECIPES
from gradfix.settings import DEFAULT_SHARD_BYTES, EvalSettings, MaskSettings, VoteSettings

Values = list[Any]  # each value: a string, or a list of strings for options that take several
STRINGS: tuple[Values, Values] = (["B/", "5", "some file.jsonl"], [])
MANY_STRINGS: tuple[Values, Values] = (["a.*", ["a.*", "b.*"], "5"], [])
POSITIVE: tuple[Values, Values] = (["1", "8", " 16 "], ["0", "-2", "8.5", "x", "1e3", ""])
FINITE: tuple[Values, Values] = (["0", "0.5", "-1", "2e1", "3"], ["abc", "nan", "inf", "-inf", ""])
NON_NEGATIVE: tuple[Values, Values] = (["0", "0.3", "2"], ["-0.1", "nan", "x"])
SIZES: tuple[Values, Values] = (["2GiB", "500MB", "1000", "30KB", "1.5GB"], ["0", "big", "-5", "2XB", ""])


def _choices(names: Any, bad: Values) -> tuple[Values, Values]:
    return list(names), bad


VOTING: dict[str, tuple[Values, Values]] = {
    "recipe": _choices(RECIPES, ["bert", "Text-Zero-Shot"]),
    "shots": (["1", "4", "all", "ALL"], ["0", "-1", "2.5", "x", ""]),
    "seed": (["0", "7", "-3"], ["x", "1.5", ""]),
    "template": STRINGS,
    "estimator": _choices(["majority", "mean"], ["median"]),
    "engine": _choices(["auto", "hooks", "vmap", "loop"], ["jit"]),
    "batch_size": POSITIVE,
    "max_length": POSITIVE,
    "device": (["cpu", "cuda", "cuda:1", "auto", "CUDA"], ["gpu", "cuda:x", "mps", ""]),
    "dtype": _choices(["auto", "float32", "bfloat16", "float16"], ["bf16", "float64", "Float32"]),
}
MASKING: dict[str, tuple[Values, Values]] = {
    "include": MANY_STRINGS,
    "exclude": MANY_STRINGS,
    "unvoted": _choices(["error", "drop", "keep"], ["skip"]),
    "gamma": FINITE,
    "threshold": NON_NEGATIVE,
    "out": STRINGS,
    "shard_size": SIZES,
    "out_format": _choices(["full", "adapter"], ["lora", "Adapter"]),
    "adapter_rank": POSITIVE,
}
TABLE: dict[str, dict[str, tuple[Values, Values]]] = {
    "transport": {
        "source_base": STRINGS,
        "source_finetuned": STRINGS,
        "target_base": STRINGS,
        "revision": STRINGS,
        "data": STRINGS,
        "votes_in": MANY_STRINGS,
        "votes_out": STRINGS,
        "method": _choices(METHODS, ["bogus", "Adaptive", "ties"]),
        **VOTING,
        "signs": _choices(["auto", "votes", "finetune"], ["vote", "FineTune"]),
        **MASKING,
        "mask": _choices(MASKS, ["bogus", "Agreement"]),
        "alpha": (["0", "0.5", "-1", "auto", "AUTO", "1e-3"], ["nan", "inf", "bogus", ""]),
        "thresholds": ([["0.2"], ["0", "0.4", "naive"], ["NAIVE"]], [["-1"], ["x"], ["0.2", "nan"]]),
        "alphas": ([["1"], ["0", "0.5", "2"]], [["nan"], ["-1"], ["x"], ["auto"]]),
        "validation": STRINGS,
    },
    "merge": {
        "source_base": MANY_STRINGS,
        "source_finetuned": MANY_STRINGS,
        "target_base": STRINGS,
        "revision": STRINGS,
        "data": MANY_STRINGS,
        "method": _choices(MERGE_METHODS, ["adaptive", "TIES"]),
        "pipeline": _choices(["plain", "mask-then-merge", "merge-then-mask"], ["mask"]),
        "density": (["0.2", "1", "1e-3"], ["0", "1.5", "-0.1", "nan", "x"]),
        "elect": _choices(["mass", "count"], ["sum"]),
        "trim_scope": _choices(["tensor", "model"], ["layer"]),
        "weights": ([["1"], ["0.5", "0.5"], ["-1", "2"]], [["x"], ["nan"], ["1", "inf"]]),
        **VOTING,
        **MASKING,
        "mask": _choices([m for m in MASKS if m not in MERGE_UNSUPPORTED_MASKS], ["tensorwise", "bogus"]),
        "alpha": (["0", "0.5", "-1"], ["auto", "nan", "x"]),
    },
    "eval": {
        "model": STRINGS,
        "revision": STRINGS,
        "data": STRINGS,
        "recipe": VOTING["recipe"],
        "template": STRINGS,
        "head_from": STRINGS,
        "batch_size": POSITIVE,
        "max_length": POSITIVE,
    },
}
FLAGS = {"overwrite", "progress", "json"}  # no value on the command line
YAML_ONLY = {"tasks"}


def _argv(command: str, key: str, value: Any) -> list[str]:
    flag = flag_of(key)
    values = value if isinstance(value, list) else [value]
    if command_options(command)[key].kind.many and not _takes_several_at_once(key):
        return [f"{flag}={v}" for v in values]  # a repeatable flag
    if isinstance(value, list):
        return [flag, *values]
    return [f"{flag}={value}"]  # also for values that start with "-"


def _takes_several_at_once(key: str) -> bool:
    return key in ("thresholds", "alphas", "weights")


def _outcome(command: str, argv: list[str], mapping: dict[str, Any], key: str) -> tuple[str, Any]:
    try:
        return "ok", validated_options(command, argv, mapping)[key]
    except ConfigError as exc:
        return "refused", str(exc)


def test_the_table_covers_every_option() -> None:
    for command, rows in TABLE.items():
        assert set(rows) | FLAGS | YAML_ONLY >= set(command_options(command)), command
        assert set(rows) <= set(command_options(command)), command


CASES = [
    pytest.param(command, key, value, valid, id=f"{command}-{key}-{value!r}")
    for command, rows in TABLE.items()
    for key, (good, bad) in rows.items()
    for valid, values in ((True, good), (False, bad))
    for value in values
]


@pytest.mark.parametrize(("command", "key", "value", "valid"), CASES)
def test_command_line_and_yaml_agree(command: str, key: str, value: Any, valid: bool) -> None:
    from_cli = _outcome(command, _argv(command, key, value), {}, key)
    from_yaml = _outcome(command, [], {key: value}, key)
    assert from_cli[0] == from_yaml[0] == ("ok" if valid else "refused"), (from_cli, from_yaml)
    if valid:
        assert from_cli[1] == from_yaml[1]
    else:
        assert from_cli[1].startswith(f"{flag_of(key)}: expected "), from_cli[1]
        assert from_yaml[1].startswith(f"--config config: {key}: expected "), from_yaml[1]


BOOLS = [("yes", True), ("no", False), ("TRUE", True), ("0", False), (1, True), (False, False)]


@pytest.mark.parametrize("command", ["transport", "merge"])
@pytest.mark.parametrize("key", ["overwrite", "progress"])
def test_flags_and_their_yaml_values_agree(command: str, key: str) -> None:
    flag_value = validated_options(command, [flag_of(key)], {})[key]
    assert flag_value is (key == "overwrite")
    for text, expected in BOOLS:
        assert validated_options(command, [], {key: text})[key] is expected
    for bad in ["maybe", "", 2, 0.5, None, ["yes"]]:
        with pytest.raises(ConfigError, match=rf"^--config config: {key}: expected true or false"):
            validated_options(command, [], {key: bad})


TASK = {"source_base": "A", "source_finetuned": "A-ft"}
# values YAML can hold but the command line cannot (numbers, booleans, lists, null)
YAML_VALUES = [
    ("transport", "batch_size", 8, 8),
    ("transport", "batch_size", "8", 8),
    ("transport", "batch_size", 8.5, None),
    ("transport", "batch_size", 8.0, None),
    ("transport", "batch_size", True, None),
    ("transport", "seed", 3, 3),
    ("transport", "seed", 1.5, None),
    ("transport", "template", 5, None),
    ("transport", "template", None, None),
    ("transport", "out", 123, None),
    ("transport", "include", 5, None),
    ("transport", "include", ["a", 5], None),
    ("transport", "include", "a.*", ["a.*"]),
    ("transport", "gamma", 2, 2.0),
    ("transport", "gamma", True, None),
    ("transport", "gamma", float("nan"), None),
    ("transport", "shots", True, None),
    ("transport", "shots", 3, 3),
    ("transport", "alpha", 0.5, 0.5),
    ("transport", "alphas", 1, [1.0]),
    ("transport", "shard_size", 1024, 1024),
    ("transport", "shard_size", True, None),
    ("transport", "engine", "hooks", "hooks"),
    ("transport", "mask", None, None),
    ("merge", "weights", 1, [1.0]),
    ("merge", "tasks", [TASK], [TASK]),
    ("merge", "tasks", [{"source_base": "A"}], None),
    ("merge", "tasks", [{"source_base": "A", "source_finetuned": "B", "extra": 1}], None),
    ("merge", "tasks", "A", None),
    ("eval", "head_from", 7, None),
]  # fmt: skip


@pytest.mark.parametrize(("command", "key", "value", "expected"), YAML_VALUES)
def test_yaml_values_of_other_types(command: str, key: str, value: Any, expected: Any) -> None:
    accepted = expected is not None or value is None
    if accepted:
        assert validated_options(command, [], {key: value})[key] == expected
    else:
        with pytest.raises(ConfigError, match=rf"^--config config: {key}: expected "):
            validated_options(command, [], {key: value})


def test_errors_name_the_key_and_list_the_choices() -> None:
    with pytest.raises(ConfigError) as refused:
        validated_options("transport", [], {"mask": "bogus"})
    assert str(refused.value) == (f"--config config: mask: expected one of {', '.join(MASKS)}, got 'bogus'")
    with pytest.raises(ConfigError, match=r"^--batch-size: expected a positive integer, got 'x'$"):
        validated_options("transport", ["--batch-size", "x"], {})
    with pytest.raises(ConfigError, match=r"unknown option\(s\) bogus_option; valid: .*batch_size"):
        validated_options("transport", [], {"bogus_option": 1})
    with pytest.raises(ConfigError, match=r"unknown option\(s\) tasks"):
        validated_options("transport", [], {"tasks": []})


def test_the_command_line_wins_and_defaults_come_from_the_settings() -> None:
    assert validated_options("transport", ["--seed", "3"], {"seed": 5, "gamma": "0.5"})["seed"] == 3
    assert validated_options("transport", ["--seed", "3"], {"seed": 5, "gamma": "0.5"})["gamma"] == 0.5
    assert validated_options("transport", ["--seed", "3"], {"seed": "x"})["seed"] == 3  # never read
    transport = validated_options("transport", [], {})
    assert transport["shard_size"] == DEFAULT_SHARD_BYTES
    votes, masking = VoteSettings(), MaskSettings()
    assert {k: transport[k] for k in ("batch_size", "max_length", "shots", "engine", "gamma")} == {
        "batch_size": votes.batch_size, "max_length": votes.max_length, "shots": votes.shots,
        "engine": votes.engine, "gamma": masking.gamma,
    }  # fmt: skip
    assert transport["method"] is None and transport["mask"] is None and transport["alpha"] is None
    assert validated_options("eval", [], {})["batch_size"] == EvalSettings().batch_size
    assert validated_options("transport", [], {"shard-size": "2GiB"})["shard_size"] == DEFAULT_SHARD_BYTES


def test_help_lists_the_registries_and_the_defaults(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["transport", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in [*METHODS, *MASKS, *RECIPES, "hooks", "(default 2GiB)", "(default 8)"]:
        assert name in text, name
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in [*MERGE_METHODS, "(default agreement)", "(default 0.2)"]:
        assert name in text, name


def _one_error(argv: list[str], capsys: pytest.CaptureFixture[str], command: str = "transport") -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("gradfix")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0].removeprefix(f"gradfix {command}: error: ")


def test_main_prints_one_line_naming_the_flag_or_the_key(tmp_path, capsys) -> None:
    config = tmp_path / "job.yaml"
    config.write_text("batch_size: x\n")
    line = _one_error(["transport", "--config", str(config)], capsys)
    assert line == f"--config {config}: batch_size: expected a positive integer, got 'x'"
    assert _one_error(["transport", "--batch-size", "x"], capsys) == (
        "--batch-size: expected a positive integer, got 'x'"
    )
    config.write_text("density: 2\n")
    assert "density: expected a number in (0, 1], got 2" in _one_error(
        ["merge", "--config", str(config)], capsys, "merge"
    )


# -- what the commands do with the validated options ------------------------------------------------
def _fake_transport(record: dict[str, Any], calls: list[dict[str, Any]]) -> Any:
    def transport(source_base, source_finetuned, target_base, out, votes, masking, **kwargs):
        calls.append({"votes": votes, "masking": masking, **kwargs})
        return record

    return transport


TRANSPORT = ["transport", "--source-base", "A", "--source-finetuned", "A-ft", "--target-base", "B",
             "--out", "B-ft"]  # fmt: skip
RECORD = {"kept_fraction": {"w": 0.5}, "method": "gradfix", "mask": "agreement", "num_samples": 6}


def test_transport_passes_the_method_and_the_mask_settings_as_given(monkeypatch, capsys) -> None:
    import gradfix.jobs

    calls: list[dict[str, Any]] = []
    descent = {"kept_fraction": 0.4712, "total_inner": -1.5}
    monkeypatch.setattr(gradfix.jobs, "transport_checkpoints", _fake_transport({**RECORD, "alpha": 0.7,
                        "descent": descent}, calls))  # fmt: skip
    assert main(TRANSPORT) == 0
    masking, kwargs = calls[0]["masking"], calls[0]
    assert kwargs["method"] is None and kwargs["shard_bytes"] == DEFAULT_SHARD_BYTES
    assert (masking.mask, masking.alpha, masking.threshold) == (None, None, None)
    assert "kept 47.12 % of τ_A's non-zero coordinates" in capsys.readouterr().out
    assert main([*TRANSPORT, "--method", "adaptive", "--alpha", "auto", "--shard-size", "1MiB"]) == 0
    assert calls[1]["method"] == "adaptive" and calls[1]["masking"].alpha == "auto"
    assert calls[1]["shard_bytes"] == 2**20


@pytest.mark.parametrize(
    ("record", "printed"),
    [
        ({**RECORD, "alpha": 0.0, "descent": {"kept_fraction": 0.03, "total_inner": 0.0}},
         "alpha = 0: the target is returned unchanged"),
        ({**RECORD, "method": "naive", "mask": "none", "alpha": 1.0},
         "no mask: every coordinate of τ_A was added"),
    ],
)  # fmt: skip
def test_the_summary_says_what_was_added(monkeypatch, capsys, record, printed) -> None:
    import gradfix.jobs

    monkeypatch.setattr(gradfix.jobs, "transport_checkpoints", _fake_transport(record, []))
    assert main(TRANSPORT) == 0
    out = capsys.readouterr().out
    assert printed in out and "kept" not in out


def test_merge_passes_the_threshold_through(monkeypatch) -> None:
    import gradfix.jobs

    calls: list[dict[str, Any]] = []

    def merge(tasks, out, target_base=None, **kwargs):
        calls.append({"tasks": tasks, **kwargs})
        return {}

    monkeypatch.setattr(gradfix.jobs, "merge_checkpoints", merge)
    argv = ["merge", "--source-base", "A", "--source-finetuned", "A1", "--source-finetuned", "A2",
            "--mask", "gate", "--threshold", "0.7", "--out", "M", "--json"]  # fmt: skip
    assert main(argv) == 0
    masking = calls[0]["masking"]
    assert masking.mask == "gate" and masking.threshold == 0.7 and masking.alpha == 1.0
    assert [t.source_finetuned for t in calls[0]["tasks"]] == ["A1", "A2"]


def test_overwrite_no_in_yaml_keeps_an_existing_output(tmp_path, capsys) -> None:
    from tiny_models import make_tiny_bert, perturbed_copy

    a = make_tiny_bert(tmp_path / "A", seed=0)
    ft = perturbed_copy(a, tmp_path / "A-ft", 0.02, seed=1)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    config = tmp_path / "job.yaml"
    config.write_text(
        f"source_base: {a}\nsource_finetuned: {ft}\ntarget_base: {a}\nout: {existing}\n"
        'method: naive\noverwrite: "no"\nprogress: false\n'
    )
    line = _one_error(["transport", "--config", str(config)], capsys)
    assert "--overwrite" in line
    assert sorted(p.name for p in existing.iterdir()) == ["keep.txt"]
    assert (existing / "keep.txt").read_text() == "mine"


def test_inspect_prints_a_dash_where_no_sign_is_shared(tmp_path, capsys) -> None:
    first = TaskVector({"w": torch.tensor([1.0, -2.0]), "z": torch.zeros(3)})
    second = TaskVector({"w": torch.tensor([1.0, 2.0]), "z": torch.tensor([1.0, 0.0, -1.0])})
    first.save(tmp_path / "a.safetensors")
    second.save(tmp_path / "b.safetensors")
    assert main(["inspect", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]) == 0
    rows = {line.split()[0]: line.split()[-1] for line in capsys.readouterr().out.splitlines()}
    assert rows["w"] == "50.00%" and rows["z"] == "-" and "nan" not in json.dumps(rows)
    assert rows["overall"] == "50.00%"
