"""The command line end to end on tiny HF BERT models saved as safetensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
    assert main(_transport_args(models, out, "--method", "gradfix")) == 0
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
    tau, _, _, _, votes = _library_inputs(models)
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
        "progress: false\nmethod: gradfix\n"
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


# -- adaptive transport: the gate threshold t and α chosen automatically ----------------------------
def _without_alpha(args: list[str]) -> list[str]:
    i = args.index("--alpha")
    return args[:i] + args[i + 2 :]


def _library_inputs(m: dict[str, Path], shots: int = 2) -> tuple[TaskVector, Any, Any, list[Any], Any]:
    """τ_A, B's model and recipe, the shots the CLI draws, and the votes on all of them."""
    examples = load_examples(m["few"])
    labels = label_set(examples)
    model, recipe = load_recipe("text-zero-shot", m["B"], labels)
    tau = TaskVector.from_checkpoints(m["A"], m["A-ft"], exclude="pooler.*")
    for name, p in model.named_parameters():
        p.requires_grad_(name in tau)
    drawn = sample_shots(examples, shots, 0, labels)
    votes = estimate_signs(model, [recipe.collate(b) for b in batched(drawn, 8)], recipe.loss, progress=False)
    return tau, model, recipe, drawn, votes


def _assert_written(out: Path, expected: dict[str, torch.Tensor]) -> None:
    written = load_state_dict(out)
    assert set(written) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(written[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_default_method_is_adaptive_and_writes_the_gate_for_the_recorded_choice(
    models, tmp_path, capsys
) -> None:
    from gradfix.methods.autotune import (
        DEFAULT_ALPHAS,
        DEFAULT_THRESHOLDS,
        GROWN_ALPHAS,
        candidate_key,
        choose_on_shots,
        gated,
    )

    out = tmp_path / "adaptive"
    assert main(_without_alpha(_transport_args(models, out))) == 0
    printed = capsys.readouterr().out
    assert "method=adaptive" in printed and "chose t=" in printed and "2-fold shots" in printed
    record = json.loads((out / "gradfix.json").read_text())
    choice = record["choice"]
    assert record["method"] == "adaptive" and choice["source"] == "2-fold shots, no-harm rule"
    scored = len(DEFAULT_ALPHAS) + len(GROWN_ALPHAS)  # the larger steps are scored on the shots too
    assert len(choice["scores"]) == len(DEFAULT_THRESHOLDS) * scored
    assert record["threshold"] == choice["threshold"] and record["alpha"] == choice["alpha"]
    chosen_key = candidate_key(choice["threshold"], choice["alpha"])
    assert choice["score"] == choice["scores"][chosen_key] <= max(choice["scores"].values())

    # the choice and the model, recomputed through the Python API
    tau, model, recipe, drawn, votes = _library_inputs(models)
    from gradfix.jobs.adaptive import correct_predictions

    labels = [ex.label for ex in drawn]
    again = choose_on_shots(
        model,
        tau,
        drawn,
        labels,
        recipe.collate,
        recipe.loss,
        unvoted="drop",
        correct=correct_predictions(recipe),
    )
    assert (again.threshold, again.alpha) == (choice["threshold"], choice["alpha"])
    assert again.scores == pytest.approx(choice["scores"], rel=1e-6)
    update = gated(tau, votes, choice["threshold"])
    _assert_written(out, update.apply_to(load_state_dict(models["B"]), choice["alpha"]))
    again_out = tmp_path / "adaptive-again"  # the choice is deterministic: byte-identical outputs
    assert main(_without_alpha(_transport_args(models, again_out))) == 0
    for name in ("model.safetensors", "gradfix.json"):
        assert (again_out / name).read_bytes() == (out / name).read_bytes(), name

    # a fixed α chooses only t; here among two gates strictly between GradFix and naive
    fixed = tmp_path / "fixed-alpha"
    assert main(_transport_args(models, fixed, "--method", "adaptive", "--thresholds", "0.2", "0.4")) == 0
    record = json.loads((fixed / "gradfix.json").read_text())
    assert set(record["choice"]["scores"]) == {"t=0.2,a=0.7", "t=0.4,a=0.7"}
    t = record["choice"]["threshold"]
    assert record["alpha"] == 0.7 and record["mask"] == "gate" and t in (0.2, 0.4)
    masked = gated(tau, votes, t)
    assert 0 < sum(int(v.count_nonzero()) for v in masked.values()) < sum(v.numel() for v in tau.values())
    _assert_written(fixed, masked.apply_to(load_state_dict(models["B"]), 0.7))


def test_adaptive_applies_the_unvoted_policy_to_every_candidate(models, tmp_path, capsys) -> None:
    args = _without_alpha(_transport_args(models, tmp_path / "x"))
    args.remove("--exclude")
    args.remove("pooler.*")  # the pooler gets no gradient from the zero-shot loss
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "pooler.dense.weight" in err and "--unvoted" in err and not (tmp_path / "x").exists()
    out = tmp_path / "dropped"
    assert main([*args[: args.index("--out")], "--out", str(out), "--no-progress", "--unvoted", "drop",
                 "--thresholds", "naive", "--alphas", "1"]) == 0  # fmt: skip
    written, b = load_state_dict(out), load_state_dict(models["B"])
    a, ft = load_state_dict(models["A"]), load_state_dict(models["A-ft"])
    assert torch.equal(written["pooler.dense.weight"], b["pooler.dense.weight"])  # dropped, even for naive
    name = "encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(written[name], b[name] + (ft[name] - a[name]), rtol=0, atol=1e-6)


def test_gradfix_with_a_fixed_alpha_is_the_published_algorithm(models, tmp_path) -> None:
    out = tmp_path / "gradfix"
    args = _without_alpha(_transport_args(models, out, "--method", "gradfix", "--alpha", "0.5"))
    assert main(args) == 0
    record = json.loads((out / "gradfix.json").read_text())
    assert record["method"] == "gradfix" and record["mask"] == "agreement" and record["alpha"] == 0.5
    assert "choice" not in record
    tau, _, _, _, votes = _library_inputs(models)
    _assert_written(
        out, mask_task_vector(tau, votes, "agreement").apply_to(load_state_dict(models["B"]), 0.5)
    )

    default_alpha = tmp_path / "gradfix-default-alpha"
    assert main(_without_alpha(_transport_args(models, default_alpha, "--method", "gradfix"))) == 0
    assert json.loads((default_alpha / "gradfix.json").read_text())["alpha"] == 1.0


def test_gradfix_with_alpha_auto_chooses_alpha_for_the_agreement_mask(models, tmp_path) -> None:
    out = tmp_path / "gradfix-auto"
    args = _without_alpha(_transport_args(models, out, "--method", "gradfix", "--alpha", "auto"))
    assert main([*args, "--alphas", "0.5", "1", "2"]) == 0
    record = json.loads((out / "gradfix.json").read_text())
    assert set(record["choice"]["scores"]) == {"t=0,a=0.5", "t=0,a=1", "t=0,a=2"}
    assert record["mask"] == "agreement" and record["choice"]["threshold"] == 0.0
    tau, _, _, _, votes = _library_inputs(models)
    expected = mask_task_vector(tau, votes, "agreement").apply_to(
        load_state_dict(models["B"]), record["alpha"]
    )
    _assert_written(out, expected)


def test_validation_file_chooses_by_the_accuracy_of_the_written_model(models, tmp_path) -> None:
    from gradfix.jobs import evaluate_model

    out = tmp_path / "validated"
    args = _without_alpha(_transport_args(models, out))
    extra = ["--validation", str(models["test"]), "--thresholds", "0.2", "naive", "--alphas", "0.5", "1"]
    assert main([*args, *extra]) == 0
    record = json.loads((out / "gradfix.json").read_text())
    choice = record["choice"]
    assert choice["source"] == "validation" and len(choice["scores"]) == 4
    assert record["validation"]["num_examples"] == 30 and len(record["validation"]["sha256"]) == 1
    assert choice["score"] == max(choice["scores"].values())
    first_best = next(k for k, v in choice["scores"].items() if v == choice["score"])
    t = "naive" if choice["threshold"] > 1 else f"{choice['threshold']:g}"
    assert first_best == f"t={t},a={choice['alpha']:g}"
    # the score is the accuracy of exactly the model written (B's own head)
    assert evaluate_model(out, models["test"])["accuracy"] == pytest.approx(choice["score"])


def test_tensorwise_mask_streamed_in_slices_equals_the_library(models, tmp_path, monkeypatch) -> None:
    import gradfix.masking.apply as apply_module

    real = apply_module.row_slices
    monkeypatch.setattr(
        apply_module, "row_slices", lambda shape, itemsize=4, budget=0: real(shape, itemsize, 600)
    )
    out = tmp_path / "tensorwise"
    assert main(_transport_args(models, out, "--method", "gradfix", "--mask", "tensorwise")) == 0
    record = json.loads((out / "gradfix.json").read_text())
    assert record["mask"] == "tensorwise"
    kept = record["kept_fraction"]
    assert any(v == 1.0 for v in kept.values()) and any(v < 0.9 for v in kept.values())
    tau, _, _, _, votes = _library_inputs(models)
    expected = mask_task_vector(tau, votes, "tensorwise")
    assert {n for n in tau if torch.equal(expected[n], tau[n])} == {n for n, v in kept.items() if v == 1.0}
    _assert_written(out, expected.apply_to(load_state_dict(models["B"]), 0.7))


def test_choosing_errors_are_one_clear_line(models, tmp_path, capsys) -> None:
    out = tmp_path / "never"
    base = _without_alpha(_transport_args(models, out))

    def error(*extra: str) -> str:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("gradfix transport: error: ")]
        assert len(lines) == 1 and "Traceback" not in err, err
        return lines[0]

    line = error("--shots", "1")
    assert "2 folds" in line and "at least 2 shots per class" in line and "--validation" in line
    assert "2 folds" in error("--method", "gradfix", "--alpha", "auto", "--shots", "1")
    assert "data file not found" in error("--validation", str(tmp_path / "absent.jsonl"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a b", "label": "sports"}\n{"text": "oops", "label": }\n')
    line = error("--validation", str(broken))
    assert line.startswith("gradfix transport: error: --validation: ") and "line 2: invalid JSON" in line
    unknown = write_jsonl(tmp_path / "politics.jsonl", [{"text": "the vote", "label": "politics"}])
    line = error("--validation", str(unknown))
    assert "--validation" in line and "label 'politics'" in line and "the labels of" in line
    line = error("--thresholds", "-1")
    assert line.endswith("--thresholds: expected finite numbers ≥ 0 or 'naive', got '-1'")
    assert error("--alphas", "nan").endswith("--alphas: expected finite numbers ≥ 0, got 'nan'")
    line = error("--method", "theseus", "--alpha", "auto")
    assert "--alpha auto" in line and "--method theseus" in line
    assert "--thresholds" in error("--method", "gradfix", "--thresholds", "0.2")
    assert "--alphas" in error("--method", "gradfix", "--alpha", "1", "--alphas", "1", "2")
    assert "--validation" in error("--method", "gradfix", "--alpha", "1", "--validation", str(models["test"]))
    assert "vote-margin gate" in error("--method", "adaptive", "--mask", "agreement")
    assert "--thresholds" in error("--method", "adaptive", "--threshold", "0.3")
    assert not out.exists()
    assert error("--alpha", "bogus").endswith("--alpha: expected a finite number or 'auto', got 'bogus'")
    config = tmp_path / "job.yaml"
    config.write_text("alpha: lots\n")
    line = error("--config", str(config))
    assert line.endswith(f"--config {config}: alpha: expected a finite number or 'auto', got 'lots'")


def test_help_describes_adaptive_and_the_published_gradfix(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["transport", "--help"])
    text = capsys.readouterr().out
    for needle in (
        "adaptive (default)",
        "2GiB",
        "--alphas",
        "--thresholds",
        "--validation",
        "ALPHA|auto",
        "tensorwise",
    ):
        assert needle in text, needle
    assert "the published algorithm" in text
