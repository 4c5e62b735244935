"""PEFT LoRA adapter folders as merge task inputs: each adapter's ``ΔW`` is its task vector."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import make_adapter, make_tiny_bert, perturbed_copy, topic_examples, write_jsonl

from gradfix import TaskVector
from gradfix.cli.main import main
from gradfix.io import load_state_dict
from gradfix.merge import merge_task_vectors

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def merge_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapter-merge")
    a = make_tiny_bert(root / "A", seed=0)
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}
    ia3 = peft.IA3Config(target_modules=["query"], feedforward_modules=[])
    return {
        "A": a,
        "lora1": make_adapter(a, root / "lora1", seed=1, config=peft.LoraConfig(**lora)),
        "lora2": make_adapter(a, root / "lora2", seed=2, config=peft.LoraConfig(**lora)),
        "ia3": make_adapter(a, root / "ia3", seed=3, config=ia3),
        "A-ft": perturbed_copy(a, root / "A-ft", scale=0.02, seed=7),
        "B": make_tiny_bert(root / "B", seed=3),
        "few": write_jsonl(root / "few.jsonl", topic_examples(4, seed=0)),
    }


def _merge(m: dict[str, Path], out: Path, *tasks: str, extra: tuple[str, ...] = ()) -> int:
    args = ["merge", "--source-base", str(m["A"])]
    for task in tasks:
        args += ["--source-finetuned", str(m[task])]
    return main([*args, "--out", str(out), "--no-progress", *extra])


def test_an_adapter_and_a_full_fine_tune_merge_as_the_library(merge_models, tmp_path) -> None:
    m, out = merge_models, tmp_path / "out"
    extra = ("--method", "task_arithmetic", "--alpha", "0.5")
    assert _merge(m, out, "lora1", "A-ft", extra=extra) == 0
    a, ft, written = load_state_dict(m["A"]), load_state_dict(m["A-ft"]), load_state_dict(out)
    lora = TaskVector.from_checkpoints(m["A"], m["lora1"])  # an adapter folder is accepted here too
    assert lora and all(".query." in n or ".value." in n for n in lora)
    for name, theta in a.items():
        if not theta.is_floating_point():
            continue
        expected = theta + 0.5 * (lora.get(name, torch.zeros_like(theta)) + (ft[name] - theta))
        torch.testing.assert_close(written[name], expected, rtol=0, atol=1e-6, msg=name)
    record = json.loads((out / "gradfix.json").read_text())
    assert set(record["tasks"][0]["source_finetuned"]["sha256"]) == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }


@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_ties_of_two_adapters_changes_only_their_modules(merge_models, tmp_path, scope) -> None:
    m, out = merge_models, tmp_path / scope
    extra = ("--density", "0.3", "--trim-scope", scope, "--alpha", "0.8")
    assert _merge(m, out, "lora1", "lora2", extra=extra) == 0
    taus = [TaskVector.from_adapter(m["A"], m[k]) for k in ("lora1", "lora2")]
    expected = merge_task_vectors(taus, "ties", density=0.3, trim_scope=scope)
    a, written = load_state_dict(m["A"]), load_state_dict(out)
    for name, theta in a.items():
        want = theta + 0.8 * expected[name] if name in expected else theta
        torch.testing.assert_close(written[name], want, rtol=0, atol=1e-6, msg=name)
    record = json.loads((out / "gradfix.json").read_text())
    assert set(record["nonzero_fraction"]) == set(expected)


def test_adapters_merged_onto_another_base_with_votes(merge_models, tmp_path) -> None:
    m, out = merge_models, tmp_path / "masked"
    extra = ("--target-base", str(m["B"]), "--data", str(m["few"]), "--data", str(m["few"]))
    extra += ("--pipeline", "mask-then-merge", "--alpha", "1")
    assert _merge(m, out, "lora1", "lora2", extra=extra) == 0
    b, written = load_state_dict(m["B"]), load_state_dict(out)
    changed = {n for n in b if not torch.equal(b[n], written[n])}
    assert changed and all(".query." in n or ".value." in n for n in changed)
    record = json.loads((out / "gradfix.json").read_text())
    assert record["descent"]["total_inner"] < 0


def test_an_unsupported_adapter_in_a_merge_is_one_line(merge_models, tmp_path, capsys) -> None:
    out = tmp_path / "never"
    assert _merge(merge_models, out, "lora1", "ia3") == 2
    err = capsys.readouterr().err.strip()
    assert "IA3" in err and "\n" not in err and not out.exists()
