"""A transport votes only on the tensors τ_A changes, holds counts only while voting, and its
descent report (from one summed backward) is the one the kept gradient sums give."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gradfix.cli.main import main

CHANGED = ("encoder.layer.1.attention.self.query.weight", "encoder.layer.1.output.dense.weight")


@pytest.fixture(scope="module")
def partial(tmp_path_factory) -> dict[str, Path]:
    """A, a fine-tune of A that changes two tensors only, B, and the voting data."""
    from tiny_models import make_tiny_bert, perturbed_copy, topic_examples, write_jsonl

    root = tmp_path_factory.mktemp("partial")
    a = make_tiny_bert(root / "A", seed=0)
    ft = perturbed_copy(a, root / "A-ft", 0.02, seed=1)
    base, tuned = load_file(a / "model.safetensors"), load_file(ft / "model.safetensors")
    mixed = {n: (tuned[n] if n in CHANGED else t) for n, t in base.items()}
    save_file(mixed, str(ft / "model.safetensors"), {"format": "pt"})
    b = make_tiny_bert(root / "B", seed=3)
    data = write_jsonl(root / "few.jsonl", topic_examples(6, seed=0))
    return {"A": a, "A-ft": ft, "B": b, "data": data}


def _transport(m: dict[str, Path], out: Path, *extra: str) -> dict:
    argv = ["transport", "--source-base", str(m["A"]), "--source-finetuned", str(m["A-ft"])]
    argv += ["--target-base", str(m["B"]), "--data", str(m["data"]), "--shots", "4"]
    argv += ["--batch-size", "3", "--no-progress", "--method", "gradfix", "--out", str(out), *extra]
    assert main(argv) == 0
    return json.loads((out / "gradfix.json").read_text())


def test_only_the_changed_tensors_vote_and_the_descent_matches_the_sums(partial, tmp_path) -> None:
    lean = _transport(partial, tmp_path / "lean")
    full = _transport(partial, tmp_path / "full", "--votes-out", str(tmp_path / "votes.safetensors"))
    shapes = {n: t.shape for n, t in load_file(partial["B"] / "model.safetensors").items()}
    parameters = sum(math.prod(shapes[n]) for n in CHANGED)
    for record, gradient in ((lean, "none"), (full, "sum")):
        data = record["data"]
        assert data["voted_tensors"] == len(CHANGED) and data["voted_parameters"] == parameters
        assert data["gradient"] == gradient
    saved = load_file(tmp_path / "votes.safetensors")
    assert {k.split("/", 1)[1] for k in saved} == set(CHANGED)
    # the same model: the mask reads only the counts, and tensors without votes have τ_A = 0
    assert (tmp_path / "lean" / "model.safetensors").read_bytes() == (
        tmp_path / "full" / "model.safetensors"
    ).read_bytes()
    one, two = lean["descent"], full["descent"]
    assert one["kept_fraction"] == two["kept_fraction"]
    assert one["total_inner"] == pytest.approx(two["total_inner"], rel=1e-4, abs=1e-9)
    assert one["total_inner"] != 0.0
    written = load_file(tmp_path / "lean" / "model.safetensors")
    target = load_file(partial["B"] / "model.safetensors")
    assert {n for n in target if not torch.equal(written[n], target[n])} <= set(CHANGED)


def test_a_mask_that_reads_the_gradient_keeps_the_sums(partial, tmp_path) -> None:
    record = _transport(partial, tmp_path / "mag", "--mask", "magnitude")
    assert record["data"]["gradient"] == "sum" and record["data"]["voted_tensors"] == len(CHANGED)
