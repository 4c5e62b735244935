"""Untrusted checkpoints and bad inputs through the real jobs: safe loading, atomic outputs, one-line errors.

Every bad input must give exit status 2 and one line ``gradfix <command>: error: ...`` naming the
file, tensor or row at fault, leave no output (nor any temporary folder) behind and leave every
input byte for byte as it was.
"""

from __future__ import annotations

import errno
import json
import pathlib
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_checks import file_hashes, one_error_line, transport_args, transport_models
from safetensors.torch import save_file
from tiny_models import make_tiny_bert, topic_examples, write_jsonl

import gradfix.io.streaming as streaming_module
import gradfix.jobs.output as apply_module
from gradfix.cli.main import main
from gradfix.errors import NonFiniteError
from gradfix.io import load_state_dict
from gradfix.jobs import MaskSettings, transport_checkpoints
from gradfix.votes import SignVotes


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return transport_models(tmp_path_factory.mktemp("adversarial"), wide=True)


def _args(m: dict[str, Any], out: Path, *extra: str, **roles: Any) -> list[str]:
    return transport_args(m, out, *extra, options=("--shots", "2"), **roles)


def _error(argv: list[str], capsys: pytest.CaptureFixture[str], command: str = "transport") -> str:
    return one_error_line(argv, capsys, command)


def _hashes(*paths: Path) -> dict[str, str]:
    return file_hashes(*paths)


def _variant(src: Path, dst: Path, change: Any) -> Path:
    """A copy of the model folder ``src`` whose weights are ``change(state_dict)`` (saved as safetensors)."""
    shutil.copytree(src, dst)
    state = dict(load_state_dict(src))
    change(state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"), {"format": "pt"})
    return dst


def _no_leftovers(folder: Path, *expected: str) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)


# -- safe loading ---------------------------------------------------------------------------------
class _TouchOnLoad:
    """Unpickling an instance of this class creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("role", ["A", "A-ft", "B"])
def test_a_pickle_that_would_run_code_is_refused_and_never_run(models, tmp_path, capsys, role) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    shutil.copytree(models[role], evil, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save({**load_state_dict(models[role]), "payload": _TouchOnLoad(marker)}, evil / "pytorch_model.bin")
    line = _error(_args(models, tmp_path / "out", **{role: evil}), capsys)
    assert "evil/pytorch_model.bin" in line and "weights_only" in line and "arbitrary code" in line
    assert "save_file" in line  # how to convert
    assert not marker.exists()
    _no_leftovers(tmp_path, "evil")


# -- atomic outputs -------------------------------------------------------------------------------
def _full_disk_on_call(monkeypatch: pytest.MonkeyPatch, failing_call: int) -> list[int]:
    """The disk fills up when the ``failing_call``-th weight shard is created."""
    calls: list[int] = []

    def open_until_full(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if "w" in mode:
            calls.append(1)
            if len(calls) == failing_call:
                raise OSError(errno.ENOSPC, "No space left on device")
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(streaming_module, "open", open_until_full, raising=False)
    return calls


def test_a_full_disk_on_the_second_shard_leaves_nothing_and_keeps_inputs(
    models, tmp_path, capsys, monkeypatch
) -> None:
    before = _hashes(models["A"], models["A-ft"], models["B"], models["few"])
    calls = _full_disk_on_call(monkeypatch, 2)
    out = tmp_path / "new" / "B-ft"
    line = _error(_args(models, out, "--shard-size", "30KB"), capsys)
    assert len(calls) == 2
    assert str(out) in line and "No space left on device" in line and "nothing was written" in line
    _no_leftovers(tmp_path)  # not even the parent folder the job created
    assert _hashes(models["A"], models["A-ft"], models["B"], models["few"]) == before

    monkeypatch.undo()
    out = tmp_path / "B-ft"
    assert main(_args(models, out, "--mask", "none")) == 0
    kept = _hashes(out)
    calls = _full_disk_on_call(monkeypatch, 3)
    line = _error(_args(models, out, "--shard-size", "30KB", "--overwrite"), capsys)
    assert "existing output is unchanged" in line
    assert _hashes(out) == kept
    _no_leftovers(tmp_path, "B-ft")


def test_a_crash_mid_write_leaves_nothing_and_an_existing_output_intact(
    models, tmp_path, monkeypatch
) -> None:
    real, seen = apply_module.apply_tensor, []

    def crash_on_sixth(*args: Any) -> torch.Tensor:
        seen.append(1)
        if len(seen) == 6:
            raise RuntimeError("power cut")
        return real(*args)

    monkeypatch.setattr(apply_module, "apply_tensor", crash_on_sixth)
    out = tmp_path / "B-ft"
    none = MaskSettings(mask="none", exclude=["pooler.*"])
    with pytest.raises(RuntimeError, match="power cut"):
        transport_checkpoints(models["A"], models["A-ft"], models["B"], out, masking=none)
    _no_leftovers(tmp_path)
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    seen.clear()
    with pytest.raises(RuntimeError, match="power cut"):
        transport_checkpoints(models["A"], models["A-ft"], models["B"], out, masking=none, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    _no_leftovers(tmp_path, "B-ft")


def test_ctrl_c_mid_write_leaves_nothing(models, tmp_path, capsys, monkeypatch) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(streaming_module.StreamingSafetensorsFile, "write", interrupted)
    assert main(_args(models, tmp_path / "out", "--mask", "none")) == 130
    assert "no output was written" in capsys.readouterr().err
    _no_leftovers(tmp_path)


def test_outputs_never_overwrite_or_nest_with_inputs(models, tmp_path, capsys) -> None:
    before = _hashes(models["A"], models["A-ft"], models["B"], models["few"])
    b, few = models["B"], models["few"]
    cases = [
        (b, "same path as input"),
        (b / "sub", "lies inside input"),
        (b.parent, "contains input"),
        (few, "same path as input"),
    ]
    for out, expected in cases:
        line = _error(_args(models, out, "--overwrite"), capsys)
        assert expected in line and str(out) in line
    out = tmp_path / "out"
    votes_cases = [
        (few, "same path as input"),
        (b / "model.safetensors", "lies inside input"),
        (out / "votes.safetensors", "lies inside input"),
    ]
    for votes_out, expected in votes_cases:
        line = _error(_args(models, out, "--votes-out", str(votes_out)), capsys)
        assert expected in line and str(votes_out) in line
    folder = tmp_path / "votes-folder"
    folder.mkdir()
    line = _error(_args(models, out, "--votes-out", str(folder), "--overwrite"), capsys)
    assert f"{folder}: --votes-out must be a file" in line
    folder.rmdir()
    existing = tmp_path / "votes.safetensors"
    existing.write_bytes(b"an earlier vote")
    line = _error(_args(models, out, "--votes-out", str(existing)), capsys)
    assert str(existing) in line and "--overwrite" in line
    assert existing.read_bytes() == b"an earlier vote"
    merge = ["merge", "--source-base", str(models["A"]), "--source-finetuned", str(models["A-ft"])]
    line = _error([*merge, "--out", str(models["A-ft"]), "--overwrite"], capsys, "merge")
    assert "same path as input" in line
    line = _error([*merge, "--out", str(models["A"] / "merged")], capsys, "merge")
    assert "lies inside input" in line
    assert _hashes(models["A"], models["A-ft"], models["B"], models["few"]) == before
    _no_leftovers(tmp_path, "votes.safetensors")


# -- bad checkpoints ------------------------------------------------------------------------------
def test_missing_truncated_and_corrupted_inputs_are_named(models, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert "nowhere: no such file or folder" in _error(_args(models, out, A=tmp_path / "nowhere"), capsys)
    assert "absent.jsonl: data file not found" in _error(
        _args(models, out, few=tmp_path / "absent.jsonl"), capsys
    )
    line = _error(_args(models, out, "--votes-in", str(tmp_path / "v.safetensors")), capsys)
    assert "v.safetensors: votes file not found" in line
    broken = tmp_path / "broken"
    shutil.copytree(models["B"], broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    line = _error(_args(models, out, B=broken), capsys)
    assert "broken/model.safetensors" in line and "truncated" in line
    (broken / "model.safetensors").write_bytes(data[:8] + b"!" + data[9:])
    line = _error(_args(models, out, B=broken), capsys)
    assert "broken/model.safetensors" in line and "not a valid safetensors file" in line
    assert not out.exists()


def test_every_name_and_shape_difference_is_summarised_on_one_line(models, tmp_path, capsys) -> None:
    def drop_bias(state: dict) -> None:
        del state["encoder.layer.1.output.LayerNorm.bias"]

    def shrink_vocab(state: dict) -> None:
        state["embeddings.word_embeddings.weight"] = state["embeddings.word_embeddings.weight"][:-1]

    ft = _variant(models["A-ft"], tmp_path / "ft", drop_bias)
    b = _variant(models["B"], tmp_path / "b", shrink_vocab)
    line = _error(_args(models, tmp_path / "out", **{"A-ft": ft, "B": b}), capsys)
    assert line.startswith("gradfix transport: error: 2 tensor(s) differ between source base")
    assert "encoder.layer.1.output.LayerNorm.bias: missing in source fine-tune" in line
    assert "embeddings.word_embeddings.weight: shapes differ" in line and "[214, 32]" in line
    line = _error(_args(models, tmp_path / "out", B=models["wide"]), capsys)
    assert "and " in line and " more" in line and "[215, 48]" in line


def test_fp16_and_bf16_inputs_are_computed_in_fp32_and_saved_in_the_target_dtype(models, tmp_path) -> None:
    def to(dtype: torch.dtype) -> Any:
        def change(state: dict) -> None:
            state.update({k: v.to(dtype) for k, v in state.items() if v.is_floating_point()})

        return change

    a = _variant(models["A"], tmp_path / "a16", to(torch.bfloat16))
    ft = _variant(models["A-ft"], tmp_path / "ft16", to(torch.bfloat16))
    b = _variant(models["B"], tmp_path / "b16", to(torch.float16))
    roles = {"A": a, "A-ft": ft, "B": b}
    assert main(_args(models, tmp_path / "naive", "--mask", "none", "--alpha", "0.7", **roles)) == 0
    sa, sf, sb = load_state_dict(a), load_state_dict(ft), load_state_dict(b)
    naive = load_state_dict(tmp_path / "naive")
    for name, theta in sb.items():
        assert naive[name].dtype == theta.dtype, name
        if theta.is_floating_point() and not name.startswith("pooler."):
            expected = (theta.float() + 0.7 * (sf[name].float() - sa[name].float())).half()
            assert torch.equal(naive[name], expected), name
    assert main(_args(models, tmp_path / "gradfix", **roles)) == 0
    masked = load_state_dict(tmp_path / "gradfix")
    assert all(masked[n].dtype == t.dtype for n, t in sb.items())
    assert all(bool(torch.isfinite(t).all()) for t in masked.values() if t.is_floating_point())


@pytest.mark.parametrize("role", ["A", "A-ft", "B"])
def test_nan_or_inf_in_any_input_names_the_file_and_every_tensor(models, tmp_path, capsys, role) -> None:
    def poison(state: dict) -> None:
        state["encoder.layer.0.attention.self.query.weight"][0, 0] = float("nan")
        state["embeddings.LayerNorm.weight"][3] = float("inf")

    bad = _variant(models[role], tmp_path / "bad", poison)
    for extra in (["--mask", "none"], []):
        line = _error(_args(models, tmp_path / "out", *extra, **{role: bad}), capsys)
        assert str(bad) in line and "NaN or Inf" in line
        assert "'encoder.layer.0.attention.self.query.weight' (1 of 1024 values)" in line
        assert "'embeddings.LayerNorm.weight' (1 of 32 values)" in line
    _no_leftovers(tmp_path, "bad")


def test_a_result_that_overflows_float16_is_refused(models, tmp_path, capsys) -> None:
    def to_half(state: dict) -> None:
        state.update({k: v.half() for k, v in state.items() if v.is_floating_point()})

    b = _variant(models["B"], tmp_path / "b16", to_half)
    line = _error(_args(models, tmp_path / "out", "--mask", "none", "--alpha", "1e7", B=b), capsys)
    assert str(b) in line and "α = 1e+07 overflows the dtype of 37 tensor(s)" in line
    assert "'embeddings.word_embeddings.weight' (torch.float16)" in line and "--alpha" in line
    _no_leftovers(tmp_path, "b16")


def test_votes_files_must_be_valid_finite_and_given_once(models, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    assert "junk.safetensors" in _error(_args(models, out, "--votes-in", str(junk)), capsys)
    shapes = {n: t.shape for n, t in load_state_dict(models["B"]).items() if t.is_floating_point()}
    grad = {n: torch.zeros(s) for n, s in shapes.items() if not n.startswith("pooler.")}
    grad["encoder.layer.0.output.dense.bias"][2] = float("nan")
    votes = SignVotes({}, grad, 4, "mean", dict.fromkeys(grad, 4))
    nan_votes = votes.save(tmp_path / "nan.safetensors")
    line = _error(_args(models, out, "--votes-in", str(nan_votes)), capsys)
    assert "nan.safetensors" in line and "'encoder.layer.0.output.dense.bias'" in line
    line = _error(_args(models, out, "--votes-in", str(junk), "--votes-in", str(junk)), capsys)
    assert f"{junk}: votes file given twice" in line
    unlabelled = tmp_path / "unlabelled.safetensors"
    save_file({"grad_sum/x": torch.zeros(1)}, str(unlabelled), {"gradfix_kind": "gradfix.sign_votes"})
    line = _error(_args(models, out, "--votes-in", str(unlabelled)), capsys)
    assert f"{unlabelled}: not a valid gradfix votes file" in line
    with pytest.raises(NonFiniteError):
        transport_checkpoints(
            models["A"], models["A-ft"], models["B"], out, masking=MaskSettings(exclude=["pooler.*"]),
            votes_in=[nan_votes], method="gradfix",
        )  # fmt: skip
    assert not out.exists()


def test_an_all_zero_task_vector_is_refused(models, tmp_path, capsys) -> None:
    copy = tmp_path / "A-copy"
    shutil.copytree(models["A"], copy)
    line = _error(_args(models, tmp_path / "out", **{"A-ft": copy}), capsys)
    assert "all zeros" in line and f"{copy} equals {models['A']}" in line and "--include" in line
    line = _error(_args(models, tmp_path / "out", "--include", "nothing.*"), capsys)
    assert f"{models['A-ft']}: no floating-point tensor is left after the --include/--exclude" in line
    merge = ["merge", "--source-base", str(models["A"]), "--out", str(tmp_path / "m")]
    line = _error(
        [*merge, "--source-finetuned", str(models["A-ft"]), "--source-finetuned", str(copy)], capsys, "merge"
    )
    assert "task vector of task 2 is all zeros" in line and str(copy) in line
    _no_leftovers(tmp_path, "A-copy")


def test_a_tensor_without_gradient_is_named(models, tmp_path, capsys) -> None:
    args = _args(models, tmp_path / "out")
    args.remove("--exclude")
    args.remove("pooler.*")
    line = _error(args, capsys)
    assert "pooler.dense.weight" in line and "--unvoted" in line and "--exclude" in line
    assert not (tmp_path / "out").exists()


# -- bad data -------------------------------------------------------------------------------------
def test_bad_data_files_name_the_file_and_the_row(models, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "empty.jsonl: file is empty" in _error(_args(models, out, few=empty), capsys)
    rows = [json.dumps({"text": "a b", "label": "sports"})] * 2
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join([*rows, '{"text": "oops", "label": }']) + "\n")
    assert "broken.jsonl, line 3: invalid JSON" in _error(_args(models, out, few=broken), capsys)
    few = tmp_path / "few.jsonl"
    write_jsonl(few, topic_examples(2, seed=0))
    line = _error(_args(models, out, "--shots", "3", few=few), capsys)
    assert str(few) in line and "3 shot(s) per class requested" in line and "'sports' has 2" in line
    line = _error(_args(models, out, "--shots", "0"), capsys)
    assert line.endswith("--shots: expected a positive integer or 'all', got '0'")
    config = tmp_path / "job.yaml"
    config.write_text("shots: none\n")
    args = _args(models, out, "--config", str(config))
    del args[args.index("--shots") : args.index("--shots") + 2]
    assert "shots: expected a positive integer or 'all', got 'none'" in _error(args, capsys)
    assert not out.exists()


def test_labels_outside_the_heads_label_set_name_the_row(models, tmp_path, capsys) -> None:
    with_head = tmp_path / "B-head"
    shutil.copytree(models["B"], with_head)
    metadata = {
        "format": "gradfix.zero-shot-head",
        "labels": json.dumps(["business", "sports", "tech"]),
        "template": json.dumps("This text is about {label}."),
        "logit_scale": "20.0",
    }
    save_file({"head": torch.randn(3, 32)}, str(with_head / "zero_shot_head.safetensors"), metadata)
    data = write_jsonl(
        tmp_path / "d.jsonl", [*topic_examples(2, seed=0), {"text": "the vote", "label": "politics"}]
    )
    line = _error(_args(models, tmp_path / "out", B=with_head, few=data), capsys)
    assert f"{data}, line 7: label 'politics'" in line and "zero_shot_head.safetensors" in line
    line = _error(["eval", "--model", str(with_head), "--data", str(data)], capsys, "eval")
    assert f"{data}, line 7: label 'politics'" in line


def test_integer_tensors_and_mismatched_votes_are_named(models, tmp_path, capsys) -> None:
    name = "encoder.layer.0.output.dense.weight"
    b = _variant(models["B"], tmp_path / "b8", lambda state: state.update({name: state[name].to(torch.int8)}))
    line = _error(_args(models, tmp_path / "out", B=b), capsys)
    assert f"'{name}' is torch.int8 in target base" in line and "--exclude" in line
    norm = "embeddings.LayerNorm.weight"
    votes = SignVotes({}, {norm: torch.zeros(7)}, 1, "mean", {norm: 1}).save(tmp_path / "v.safetensors")
    line = _error(_args(models, tmp_path / "out", "--votes-in", str(votes)), capsys)
    assert f"{norm}: shapes differ (votes files [7], task vector [32])" in line
    _no_leftovers(tmp_path, "b8", "v.safetensors")


def test_labels_a_classifier_does_not_know_name_the_row(tmp_path, capsys) -> None:
    model = make_tiny_bert(tmp_path / "clf", seed=0, num_labels=["negative", "positive"])
    data = write_jsonl(
        tmp_path / "d.jsonl", [{"text": "good", "label": "positive"}, {"text": "meh", "label": "so-so"}]
    )
    line = _error(
        ["eval", "--model", str(model), "--data", str(data), "--recipe", "sequence-classification"],
        capsys,
        "eval",
    )
    assert f"{data}, line 2: label 'so-so'" in line and "id2label" in line and "config.json" in line


def test_a_multi_line_message_is_printed_on_one_line(monkeypatch, capsys) -> None:
    import gradfix.cli.main as cli

    def fail(args: Any) -> None:
        raise NonFiniteError("first line\n  second line\n\n  third")

    monkeypatch.setattr(cli, "run_eval", fail)
    line = _error(["eval", "--model", "m", "--data", "d.jsonl"], capsys, "eval")
    assert line == "gradfix eval: error: first line; second line; third"
