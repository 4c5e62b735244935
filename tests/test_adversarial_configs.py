"""Hostile inputs that used to give a silently wrong model, a traceback or a misleading message.

Each case builds its own input in ``tmp_path`` (a model folder whose config disagrees with its
weights, a folder without tokenizer, a malformed votes file, one-class data, a bad CSV or YAML)
and runs the real command line. Every case ends in exit status 2 with one line
``gradfix <command>: error: ...`` naming the file and the values at fault, no output or
temporary folder left behind and every input byte for byte as it was; or, where the input is
fine after all, in the correct result.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_checks import file_hashes, one_error_line, transport_models
from safetensors.torch import save_file
from tiny_models import make_tiny_bert, topic_examples, write_jsonl

from gradfix.cli.config import validated_options
from gradfix.cli.main import main
from gradfix.io import load_state_dict
from gradfix.recipes import load_recipe
from gradfix.votes.file import VOTES_KIND

NORM = "embeddings.LayerNorm.weight"
TOPICS = ["business", "sports", "tech"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return transport_models(tmp_path_factory.mktemp("adversarial"))


def _transport(m: dict[str, Path], out: Path, *extra: str, **roles: Path) -> list[str]:
    paths = {**m, **roles}
    return [
        "transport",
        "--source-base", str(paths["A"]),
        "--source-finetuned", str(paths["A-ft"]),
        "--target-base", str(paths["B"]),
        "--exclude", "pooler.*",
        "--out", str(out),
        "--no-progress",
        *extra,
    ]  # fmt: skip


def _voting(m: dict[str, Path], data: Path | None = None) -> list[str]:
    return ["--data", str(data or m["few"]), "--shots", "2"]


def _error(argv: list[str], capsys: pytest.CaptureFixture[str], command: str = "transport") -> str:
    return one_error_line(argv, capsys, command)


def _hashes(*paths: Path) -> dict[str, str]:
    return file_hashes(*paths)


def _refused(
    argv: list[str], capsys: pytest.CaptureFixture[str], inputs: list[Path], command: str = "transport"
) -> str:
    """:func:`_error`, with no output left (``--out``) and every input unchanged."""
    before = _hashes(*inputs)
    line = _error(argv, capsys, command)
    if "--out" in argv:
        out = Path(argv[argv.index("--out") + 1])
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(("." + out.name, out.name))]
    assert _hashes(*inputs) == before
    return line


def _with_config(src: Path, dst: Path, **changes: Any) -> Path:
    """A copy of the model folder ``src`` whose ``config.json`` has ``changes``."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _with_weights(src: Path, dst: Path, change: Callable[[dict[str, torch.Tensor]], Any]) -> Path:
    """A copy of the model folder ``src`` whose weights are ``change(state_dict)``."""
    shutil.copytree(src, dst)
    state = dict(load_state_dict(src))
    change(state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"), {"format": "pt"})
    return dst


def _without_tokenizer(src: Path, dst: Path) -> Path:
    keep = {"config.json", "model.safetensors"}
    shutil.copytree(src, dst, ignore=lambda _, names: [n for n in names if n not in keep])
    return dst


# -- the target's config against its weights ------------------------------------------------------
LAYERS = "but the weights hold 2 layers (encoder.layer.0-1)"
EMBEDDING = "but the weights' embeddings.word_embeddings.weight is [215, 32]"
CONFIG_CASES = {
    "more-layers": ({"num_hidden_layers": 3}, f"num_hidden_layers is 3 {LAYERS}"),
    "fewer-layers": ({"num_hidden_layers": 1}, f"num_hidden_layers is 1 {LAYERS}"),
    "hidden": ({"hidden_size": 48}, f"hidden_size is 48 {EMBEDDING}"),
    "vocab": ({"vocab_size": 500}, f"vocab_size is 500 {EMBEDDING}"),
    "intermediate": ({"intermediate_size": 128}, "intermediate_size is 128 but the weights' encoder.layer.0"),
    "not-a-number": ({"num_hidden_layers": "2"}, "num_hidden_layers is '2', not a positive integer"),
    "bool": ({"hidden_size": True}, "hidden_size is True, not a positive integer"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_a_config_that_disagrees_with_the_weights_is_refused_before_voting(
    models, tmp_path, capsys, case
) -> None:
    changes, expected = CONFIG_CASES[case]
    target = _with_config(models["B"], tmp_path / "B", **changes)
    argv = _transport(models, tmp_path / "out", *_voting(models), B=target)
    line = _refused(argv, capsys, [models["A"], models["A-ft"], target, models["few"]])
    assert f"{target}/config.json: {expected}" in line


def test_a_layer_gap_is_refused_not_initialised_at_random(models, tmp_path, capsys) -> None:
    def move_layer(state: dict[str, torch.Tensor]) -> None:
        for name in [n for n in state if n.startswith("encoder.layer.1.")]:
            state[name.replace("layer.1.", "layer.2.")] = state.pop(name)

    target = _with_weights(models["B"], tmp_path / "gap", move_layer)
    argv = ["eval", "--model", str(target), "--data", str(models["few"])]
    line = _refused(argv, capsys, [target, models["few"]], "eval")
    assert f"{target}: config.json describes" in line and "encoder.layer.1." in line
    assert "initialised at random" in line


def test_a_missing_tensor_is_refused_not_initialised_at_random(models, tmp_path, capsys) -> None:
    target = _with_weights(models["B"], tmp_path / "hole", lambda state: state.pop(NORM))
    line = _refused(["eval", "--model", str(target), "--data", str(models["few"])], capsys, [target], "eval")
    assert f"{target}: config.json describes 1 tensor(s) that the weights lack ({NORM})" in line


def test_a_stray_tensor_inside_the_model_is_refused(models, tmp_path, capsys) -> None:
    def add(state: dict[str, torch.Tensor]) -> None:
        state["encoder.layer.0.extra.weight"] = torch.zeros(3)

    target = _with_weights(models["B"], tmp_path / "stray", add)
    line = _refused(["eval", "--model", str(target), "--data", str(models["few"])], capsys, [target], "eval")
    assert "has no place for (encoder.layer.0.extra.weight)" in line


def test_a_classifier_without_its_head_is_refused(models, tmp_path, capsys) -> None:
    data = write_jsonl(tmp_path / "two.jsonl", topic_examples(2, seed=0, labels=["sports", "tech"]))
    argv = ["eval", "--model", str(models["B"]), "--data", str(data), "--recipe", "sequence-classification"]
    line = _refused(argv, capsys, [models["B"], data], "eval")
    assert "classifier.weight" in line and "initialised at random" in line


def test_a_classifier_folder_still_serves_as_an_encoder(tmp_path) -> None:
    folder = make_tiny_bert(tmp_path / "clf", seed=0, num_labels=["a", "b"])
    model, recipe = load_recipe("text-zero-shot", folder, TOPICS)  # the classifier head is dropped
    assert recipe.labels == TOPICS and not hasattr(model, "classifier")


# -- tokenizer ------------------------------------------------------------------------------------
def test_a_target_without_tokenizer_files_is_refused(models, tmp_path, capsys) -> None:
    target = _without_tokenizer(models["B"], tmp_path / "B")
    argv = _transport(models, tmp_path / "out", *_voting(models), B=target)
    line = _refused(argv, capsys, [models["A"], models["A-ft"], target, models["few"]])
    assert f"{target}: no tokenizer files (looked for tokenizer.json, vocab.txt" in line


def test_a_tokenizer_far_smaller_than_the_embedding_is_refused(models, tmp_path, capsys) -> None:
    target = _without_tokenizer(models["B"], tmp_path / "B")
    (target / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    argv = ["eval", "--model", str(target), "--data", str(models["few"])]
    line = _refused(argv, capsys, [target, models["few"]], "eval")
    assert "the tokenizer has 5 tokens but the model's embedding has 215 rows" in line


# -- votes files ----------------------------------------------------------------------------------
def _votes_file(path: Path, tensors: dict[str, torch.Tensor] | None = None, **meta: str) -> Path:
    header = {
        "gradfix_kind": VOTES_KIND,
        "num_samples": "4",
        "estimator": "mean",
        "hits": json.dumps({NORM: 4}),
    }
    header.update(meta)
    if tensors is None:
        tensors = {f"grad_sum/{NORM}": torch.ones(32)}
    save_file(tensors, str(path), header)
    return path


VOTES_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "negative-samples": ({"num_samples": "-5"}, "num_samples '-5' is not a non-negative integer"),
    "zero-samples": ({"num_samples": "0", "hits": "{}"}, "num_samples '0' is zero"),
    "huge-samples": ({"num_samples": str(10**30)}, "is larger than 2**62"),
    "negative-hits": ({"hits": json.dumps({NORM: -3})}, f"hits of '{NORM}' is -3, not an integer from 0"),
    "bool-counts": (
        {"tensors": {f"grad_sum/{NORM}": torch.ones(32), f"counts/{NORM}": torch.ones(32, dtype=torch.bool)}},
        "are torch.bool, not an integer dtype",
    ),
    "counts-above-samples": (
        {"tensors": {f"grad_sum/{NORM}": torch.ones(32), f"counts/{NORM}": torch.full((32,), 9)}},
        "reach 9, more than num_samples (4)",
    ),
    "counts-shape": (
        {
            "tensors": {
                f"grad_sum/{NORM}": torch.ones(32),
                f"counts/{NORM}": torch.ones(4, 8, dtype=torch.int64),
            }
        },
        "have shape [4, 8], its gradient sum [32]",
    ),
    "another-model": (
        {"tensors": {"grad_sum/h.0.attn.c_attn.weight": torch.ones(32, 96)}, "hits": "{}"},
        "none of the votes file's 1 tensors (e.g. 'h.0.attn.c_attn.weight') is a tensor of the task vector",
    ),
    "no-votes": (
        {"tensors": {"unrelated": torch.ones(1)}, "hits": "{}"},
        "the votes file holds no voted tensors",
    ),
}


@pytest.mark.parametrize("case", VOTES_CASES)
def test_a_malformed_votes_file_is_refused(models, tmp_path, capsys, case) -> None:
    changes, expected = VOTES_CASES[case]
    meta = {k: v for k, v in changes.items() if k != "tensors"}
    votes = _votes_file(tmp_path / "v.safetensors", changes.get("tensors"), **meta)
    argv = _transport(models, tmp_path / "out", "--method", "gradfix", "--votes-in", str(votes))
    line = _refused(argv, capsys, [models["A"], models["A-ft"], models["B"], votes])
    assert str(votes) in line and expected in line


# -- messages that used to mislead ----------------------------------------------------------------
def test_one_class_data_says_so(models, tmp_path, capsys) -> None:
    one = write_jsonl(tmp_path / "one.jsonl", topic_examples(4, seed=0, labels=["sports"]))
    argv = _transport(models, tmp_path / "out", *_voting(models, one))
    line = _refused(argv, capsys, [models["A"], models["A-ft"], models["B"], one])
    assert f"{one}: every example has the label 'sports'" in line and "no gradient" in line


def test_a_csv_error_names_the_physical_line(models, tmp_path, capsys) -> None:
    data = tmp_path / "d.csv"
    data.write_text("text,label\nthe team won,sports\nshares fell,business\n" + "a" * 200_000 + ",tech\n")
    argv = _transport(models, tmp_path / "out", *_voting(models, data))
    line = _refused(argv, capsys, [models["A"], models["A-ft"], models["B"], data])
    assert f"{data}, line 4: malformed row (field larger than field limit" in line


def test_a_data_list_in_yaml_is_refused_by_transport_and_taken_by_merge(models, tmp_path, capsys) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(f"data:\n  - {models['few']}\n  - {models['few']}\n")
    argv = _transport(models, tmp_path / "out", "--config", str(config))
    line = _refused(argv, capsys, [models["A"], models["A-ft"], models["B"], config])
    assert f"--config {config}: data: transport takes one data file, got a list of 2" in line
    assert "merge takes a list" in line
    merged = validated_options("merge", [], {"data": [str(models["few"])] * 2})
    assert merged["data"] == [str(models["few"])] * 2


def test_a_sound_target_passes_the_checks_and_gives_the_same_model_twice(models, tmp_path) -> None:
    outputs = []
    for run in ("first", "second"):
        out = tmp_path / run
        assert main(_transport(models, out, *_voting(models), "--mask", "agreement", "--alpha", "1")) == 0
        outputs.append(_hashes(out / "model.safetensors").popitem()[1])
    assert outputs[0] == outputs[1]
