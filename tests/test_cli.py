"""The command line end to end on tiny HF BERT models saved as safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_bert, perturbed_copy, topic_examples, write_jsonl

from gradfix import TaskVector, estimate_signs, mask_task_vector
from gradfix.cli.main import main
from gradfix.data import batched, label_set, load_examples, sample_shots
from gradfix.io import load_state_dict
from gradfix.recipes import load_recipe


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    a = make_tiny_bert(root / "A", seed=0)
    paths = {
        "A": a,
        "A-ft": perturbed_copy(a, root / "A-ft", 0.02, seed=1),
        "A-ft2": perturbed_copy(a, root / "A-ft2", 0.02, seed=2),
        "B": make_tiny_bert(root / "B", seed=3),
        "wide": make_tiny_bert(root / "wide", seed=4, hidden=48, heads=2),
        "few": write_jsonl(root / "few.jsonl", topic_examples(6, seed=0)),
        "test": write_jsonl(root / "test.jsonl", topic_examples(10, seed=1)),
    }
    return paths


def _transport_args(m: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "transport",
        "--source-base",
        str(m["A"]),
        "--source-finetuned",
        str(m["A-ft"]),
        "--target-base",
        str(m["B"]),
        "--data",
        str(m["few"]),
        "--shots",
        "2",
        "--alpha",
        "0.7",
        "--exclude",
        "pooler.*",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def test_transport_writes_a_loadable_model_equal_to_the_library_result(models, tmp_path, capsys) -> None:
    out = tmp_path / "B-ft"
    assert main(_transport_args(models, out)) == 0
    assert "wrote" in capsys.readouterr().out
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "gradfix.json",
        "zero_shot_head.safetensors",
    ):
        assert (out / name).is_file(), name

    from transformers import AutoModel, AutoTokenizer

    AutoModel.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)

    record = json.loads((out / "gradfix.json").read_text())
    assert record["shots"] == 2 and record["alpha"] == 0.7 and record["mask"] == "agreement"
    assert record["num_samples"] == 6 and record["estimator"] == "majority"
    assert set(record["inputs"]) == {"source_base", "source_finetuned", "target_base"}
    assert all(len(h) == 64 for h in record["inputs"]["target_base"]["sha256"].values())
    assert record["descent"]["total_inner"] < 0
    assert "pooler.dense.weight" not in record["kept_fraction"]

    # the same job through the Python API gives the same weights
    examples = load_examples(models["few"])
    labels = label_set(examples)
    model, recipe = load_recipe("text-zero-shot", models["B"], labels)
    tau = TaskVector.from_checkpoints(models["A"], models["A-ft"], exclude="pooler.*")
    for name, p in model.named_parameters():
        p.requires_grad_(name in tau)
    shots = sample_shots(examples, 2, 0, labels)
    votes = estimate_signs(model, [recipe.collate(b) for b in batched(shots, 8)], recipe.loss, progress=False)
    expected = mask_task_vector(tau, votes).apply_to(load_state_dict(models["B"]), 0.7)
    written = load_state_dict(out)
    assert set(written) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(written[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_eval_uses_the_saved_head_and_inspect_prints_agreement(models, tmp_path, capsys) -> None:
    out = tmp_path / "B-ft"
    assert main(_transport_args(models, out, "--mask", "none")) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--data", str(models["test"]), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["examples"] == 30
    assert main(["inspect", str(out), "--top", "3"]) == 0
    assert "more tensors" in capsys.readouterr().out
    tau_a = tmp_path / "a.safetensors"
    TaskVector.from_checkpoints(models["A"], models["A-ft"]).save(tau_a)
    TaskVector.from_checkpoints(models["A"], models["A-ft"]).save(tmp_path / "a2.safetensors")
    assert main(["inspect", str(tau_a), str(tmp_path / "a2.safetensors"), "--json"]) == 0
    agreement = json.loads(capsys.readouterr().out)["sign_agreement"]
    assert all(v == 1.0 for v in agreement.values())
    assert (
        main(
            [
                "inspect",
                "--base",
                str(models["A"]),
                "--finetuned",
                str(models["A-ft"]),
                "--other-base",
                str(models["A"]),
                "--other-finetuned",
                str(models["A-ft2"]),
            ]
        )
        == 0
    )
    assert "overall" in capsys.readouterr().out


def test_yaml_config_drives_transport_and_the_command_line_wins(models, tmp_path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(
        f"source-base: {models['A']}\nsource_finetuned: {models['A-ft']}\ntarget_base: {models['B']}\n"
        f"data: {models['few']}\nshots: 1\nalpha: 0.5\nexclude: ['pooler.*']\nout: {tmp_path / 'from-yaml'}\n"
        "progress: false\n"
    )
    assert main(["transport", "--config", str(config), "--alpha", "0.25"]) == 0
    record = json.loads((tmp_path / "from-yaml" / "gradfix.json").read_text())
    assert record["alpha"] == 0.25 and record["shots"] == 1 and record["num_samples"] == 3
    config.write_text("bogus_option: 1\n")
    assert main(["transport", "--config", str(config)]) == 2


def test_merge_plain_and_merge_then_mask(models, tmp_path) -> None:
    plain = tmp_path / "plain"
    args = [
        "merge",
        "--source-base",
        str(models["A"]),
        "--source-finetuned",
        str(models["A-ft"]),
        "--source-finetuned",
        str(models["A-ft2"]),
        "--method",
        "task_arithmetic",
        "--alpha",
        "0.5",
        "--out",
        str(plain),
        "--no-progress",
    ]
    assert main(args) == 0
    merged = load_state_dict(plain)
    a, f1, f2 = (load_state_dict(models[k]) for k in ("A", "A-ft", "A-ft2"))
    name = "encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(merged[name], a[name] + 0.5 * ((f1[name] - a[name]) + (f2[name] - a[name])))

    masked = tmp_path / "masked"
    args = [
        "merge",
        "--source-base",
        str(models["A"]),
        "--source-finetuned",
        str(models["A-ft"]),
        "--source-finetuned",
        str(models["A-ft2"]),
        "--target-base",
        str(models["B"]),
        "--data",
        str(models["few"]),
        "--pipeline",
        "merge-then-mask",
        "--exclude",
        "pooler.*",
        "--out",
        str(masked),
        "--no-progress",
    ]
    assert main(args) == 0
    record = json.loads((masked / "gradfix.json").read_text())
    assert record["pipeline"] == "merge-then-mask" and len(record["tasks"]) == 2
    assert record["descent"]["total_inner"] < 0


def test_errors_are_one_clear_line_and_leave_nothing_behind(models, tmp_path, capsys) -> None:
    out = tmp_path / "never"
    assert main(["transport", "--source-base", str(models["A"]), "--out", str(out)]) == 2
    assert "missing --source-finetuned, --target-base" in capsys.readouterr().err
    args = _transport_args(models, out)
    args[args.index(str(models["B"]))] = str(models["wide"])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "shapes differ" in err and "embeddings.word_embeddings.weight" in err and "[215, 48]" in err
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert main(_transport_args(models, existing)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (existing / "keep.txt").read_text() == "mine"
    assert main(_transport_args(models, Path(models["B"]))) == 2
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_help_for_each_command(capsys) -> None:
    for command in ("transport", "merge", "eval", "inspect"):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
        assert "--config" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["transfusion", "theseus"])
def test_alignment_methods_through_the_cli(models, tmp_path, method) -> None:
    out = tmp_path / method
    args = [
        "transport", "--source-base", str(models["A"]), "--source-finetuned", str(models["A-ft"]),
        "--target-base", str(models["B"]), "--method", method, "--out", str(out), "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    record = json.loads((out / "gradfix.json").read_text())
    assert record["method"] == method and record["mask"] == "none"
    written, target = load_state_dict(out), load_state_dict(models["B"])
    assert set(written) == set(target)
    assert any(not torch.equal(written[n], target[n]) for n in target)
    masked = tmp_path / f"{method}-gradfix"
    assert (
        main(
            [
                *args[:-3],
                "--out",
                str(masked),
                "--mask",
                "agreement",
                "--data",
                str(models["few"]),
                "--exclude",
                "pooler.*",
                "--no-progress",
            ]
        )
        == 0
    )
    record = json.loads((masked / "gradfix.json").read_text())
    assert record["mask"] == "agreement" and record["descent"]["total_inner"] < 0


def test_naive_method_refuses_a_mask(models, tmp_path, capsys) -> None:
    args = _transport_args(models, tmp_path / "x", "--method", "naive", "--mask", "agreement")
    assert main(args) == 2
    assert "--method naive" in capsys.readouterr().err


def test_gate_mask_through_the_cli(models, tmp_path) -> None:
    out = tmp_path / "gate"
    assert main(_transport_args(models, out, "--mask", "gate", "--threshold", "2")) == 0
    naive = tmp_path / "naive"
    assert main(_transport_args(models, naive, "--method", "naive")) == 0
    a, b = load_state_dict(out), load_state_dict(naive)
    assert all(torch.equal(a[n], b[n]) for n in a)  # a threshold above 1 never drops: naive addition


@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_ties_merge_streamed_equals_the_library_merge(models, tmp_path, scope) -> None:
    from gradfix.merge import merge_task_vectors

    out = tmp_path / scope
    args = ["merge", "--source-base", str(models["A"]), "--source-finetuned", str(models["A-ft"]),
            "--source-finetuned", str(models["A-ft2"]), "--density", "0.3", "--trim-scope", scope,
            "--alpha", "0.8", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    taus = [TaskVector.from_checkpoints(models["A"], models[k]) for k in ("A-ft", "A-ft2")]
    expected = merge_task_vectors(taus, "ties", density=0.3, trim_scope=scope).apply_to(
        load_state_dict(models["A"]), 0.8
    )
    written = load_state_dict(out)
    for name, tensor in expected.items():
        torch.testing.assert_close(written[name], tensor, rtol=0, atol=1e-6, msg=name)
    record = json.loads((out / "gradfix.json").read_text())
    assert 0.25 < sum(record["nonzero_fraction"].values()) / len(record["nonzero_fraction"]) < 0.7
