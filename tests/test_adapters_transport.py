"""A PEFT LoRA adapter as ``--source-finetuned``: only its modules vote and change, as in the API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli import _assert_written
from tiny_models import make_adapter, make_tiny_bert, topic_examples, write_jsonl

from gradfix import TaskVector, estimate_signs, mask_task_vector
from gradfix.cli.main import main
from gradfix.data import batched, label_set, load_examples, sample_shots
from gradfix.io import load_state_dict
from gradfix.recipes import load_recipe

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def adapter_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapter")
    a = make_tiny_bert(root / "A", seed=0)
    make_adapter(a, root / "adapter")
    return {
        "A": a,
        "adapter": root / "adapter",
        "B": make_tiny_bert(root / "B", seed=3),
        "few": write_jsonl(root / "few.jsonl", topic_examples(4, seed=0)),
    }


def _args(m: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "transport", "--source-base", str(m["A"]), "--source-finetuned", str(m["adapter"]),
        "--target-base", str(m["B"]), "--data", str(m["few"]), "--shots", "2", "--alpha", "0.7",
        "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


def test_an_adapter_transported_with_gradfix_equals_the_library(adapter_models, tmp_path) -> None:
    m, out = adapter_models, tmp_path / "out"
    assert main(_args(m, out, "--method", "gradfix")) == 0
    tau = TaskVector.from_adapter(m["A"], m["adapter"])
    assert tau and all(".query." in n or ".value." in n for n in tau)
    record = json.loads((out / "gradfix.json").read_text())
    assert set(record["kept_fraction"]) == set(tau)
    assert set(record["inputs"]["source_finetuned"]["sha256"]) == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    examples = load_examples(m["few"])
    labels = label_set(examples)
    model, recipe = load_recipe("text-zero-shot", m["B"], labels)
    for name, param in model.named_parameters():
        param.requires_grad_(name in tau)  # only the adapter's modules vote
    drawn = sample_shots(examples, 2, 0, labels)
    votes = estimate_signs(model, [recipe.collate(b) for b in batched(drawn, 8)], recipe.loss, progress=False)
    assert set(votes.grad_sum) == set(tau)
    expected = mask_task_vector(tau, votes).apply_to(load_state_dict(m["B"]), 0.7)
    _assert_written(out, expected)


def test_naive_addition_of_an_adapter_changes_only_its_modules(adapter_models, tmp_path) -> None:
    m, out = adapter_models, tmp_path / "naive"
    assert main(_args(m, out, "--method", "naive")) == 0
    written, target = load_state_dict(out), load_state_dict(m["B"])
    tau = TaskVector.from_adapter(m["A"], m["adapter"])
    changed = {n for n in target if not torch.equal(written[n], target[n])}
    assert changed == set(tau)
    _assert_written(out, tau.apply_to(target, 0.7))
