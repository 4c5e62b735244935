"""The transport states the check's verdict from its own votes, and the default follows it.

Tiny BERTs: ``A``, its fine-tune ``A-ft`` (a task-like ``τ_A``), ``B-near`` (``A`` plus small
noise: a continued release), ``B-perm`` (``B-near`` with its residual stream and FFN units
permuted: the same function on other coordinates) and ``B-far`` (another initialisation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from check_models import finetune, permuted
from cli_checks import one_error_line, transport_args
from tiny_models import make_tiny_bert, perturbed_copy, topic_examples, write_jsonl

from gradfix.cli.main import main
from gradfix.io import load_state_dict
from gradfix.jobs.check_stats import unit_shuffle, unit_shuffle_at
from gradfix.jobs.check_votes import rebasin_blocker, verdict_from_votes, warning_line
from gradfix.masking import TauRows, VoteReference
from gradfix.votes import SignVotes

WARNING = "gradfix: warning: "
SMALL_GRID = ("--thresholds", "0", "naive", "--alphas", "0", "1")
"""A small grid where the choice does not matter (the verdict does not depend on it)."""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("verdict")
    a = make_tiny_bert(root / "A", seed=0)
    near = perturbed_copy(a, root / "B-near", 0.002, seed=5)
    return {
        "A": a,
        "A-ft": finetune(a, root / "A-ft"),
        "B": near,
        "B-near": near,
        "B-perm": permuted(near, root / "B-perm", seed=11),
        "B-far": make_tiny_bert(root / "B-far", seed=3),
        "wide": make_tiny_bert(root / "wide", seed=4, hidden=48, heads=2),
        "few": write_jsonl(root / "few.jsonl", topic_examples(4, seed=0)),
    }


def _transport(
    m: dict[str, Path], target: str, out: Path, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[dict[str, Any], str]:
    """Run ``gradfix transport`` onto ``m[target]``: its record and its stderr."""
    argv = transport_args(m, out, "--json", *extra, options=["--shots", "2"], B=m[target])
    assert main(argv) == 0
    err = capsys.readouterr().err
    return json.loads((out / "gradfix.json").read_text()), err


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(WARNING)]


def test_continued_release_transfers_without_warning(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record, err = _transport(models, "B-near", tmp_path / "out", capsys, *SMALL_GRID)
    check = record["check"]
    assert check["verdict"] == "transfers" and check["recommended_method"] in ("naive", "adaptive")
    null = check["sign_agreement"]["null"]
    assert check["sign_agreement"]["estimate"] > null["high"]
    assert check["rebasin"]["tried"] is False and "aligned_by" not in record
    assert "no bootstrap" in check["statistic"] and "note" not in check
    assert _warnings(err) == []
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Pre-flight check" in card and "**transfers**" in card


def test_unrelated_base_warns_that_nothing_transfers(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record, err = _transport(models, "B-far", tmp_path / "out", capsys, *SMALL_GRID)
    check = record["check"]
    assert check["verdict"] == "nothing-transfers" and check["recommended_method"] == "fine-tune B"
    null = check["sign_agreement"]["null"]
    assert null["low"] <= check["sign_agreement"]["estimate"] <= null["high"]
    assert check["rebasin"]["tried"] is True  # a permutable layout: tried, and it did not help
    assert "aligned_by" not in record
    assert "B's own gradient step on the shots, not A's knowledge" in check["note"]
    (line,) = _warnings(err)
    assert "sign agreement of τ_A with B's votes" in line and "chance" in line and check["note"] in line
    assert check["note"] in (tmp_path / "out" / "README.md").read_text()


def test_permuted_release_is_aligned_by_the_default(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the adaptive method (the default) with naive addition at α = 1 as its only candidate
    fixed = ("--thresholds", "naive", "--alpha", "1")
    record, err = _transport(models, "B-perm", tmp_path / "fixed", capsys, *fixed)
    check = record["check"]
    assert record["method"] == "adaptive"
    assert check["verdict"] == "permutation" and check["recommended_method"] == "transfusion"
    assert record["aligned_by"] == check["aligned_by"] == "transfusion"
    assert check["rebasin"]["sign_agreement"]["estimate"] > check["sign_agreement"]["null"]["high"]
    (line,) = _warnings(err)
    assert "after re-basin" in line and "aligned by re-basin (transfusion)" in line
    assert "aligned to B by re-basin" in (tmp_path / "fixed" / "README.md").read_text()
    # ... writes what --method transfusion writes
    aligned, err = _transport(models, "B-perm", tmp_path / "tf", capsys, "--method", "transfusion")
    assert "check" not in aligned and _warnings(err) == []  # no mask, no votes: nothing to check
    ours, theirs = load_state_dict(tmp_path / "fixed"), load_state_dict(tmp_path / "tf")
    b = load_state_dict(models["B-perm"])
    moved = [n for n in theirs if not torch.equal(theirs[n], b[n])]
    assert moved and all(torch.allclose(ours[n], theirs[n], atol=1e-6) for n in theirs)


def test_other_methods_warn_but_keep_tau(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record, err = _transport(models, "B-perm", tmp_path / "out", capsys, "--method", "gradfix")
    assert record["check"]["verdict"] == "permutation" and "aligned_by" not in record
    (line,) = _warnings(err)
    assert "use --method transfusion" in line
    masked = ("--method", "transfusion", "--mask", "agreement")
    aligned, err = _transport(models, "B-perm", tmp_path / "tf", capsys, *masked)
    assert aligned["check"]["tau"] == "aligned to B by --method transfusion"
    assert aligned["check"]["verdict"] == "transfers" and _warnings(err) == []


def test_bad_input_is_still_one_line_and_writes_nothing(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m = models
    out = tmp_path / "out"
    assert "wide" in one_error_line(transport_args(m, out, B=m["wide"]), capsys)
    assert "nowhere" in one_error_line(transport_args(m, out, A=tmp_path / "nowhere"), capsys)
    one_class = write_jsonl(tmp_path / "one.jsonl", topic_examples(3, seed=0, labels=["sports"]))
    assert "two labels" in one_error_line(transport_args(m, out, few=one_class), capsys)
    assert "all zeros" in one_error_line(transport_args(m, out, **{"A-ft": m["A"]}), capsys)
    assert not out.exists()


def test_rebasin_blocker_reads_only_headers(models: dict[str, Path], tmp_path: Path) -> None:
    assert rebasin_blocker(models["A"], models["B-perm"]) == ""
    assert "shapes differ" in rebasin_blocker(models["A"], models["wide"])
    weights = tmp_path / "weights.safetensors"  # no config: the heads are unknown
    weights.symlink_to(models["A"] / "model.safetensors")
    assert "num_heads" in rebasin_blocker(weights, weights)


def test_unit_shuffle_at_matches_the_whole_shuffle() -> None:
    for shape in [(7,), (5, 6), (4, 3, 2, 2), ()]:
        t = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        picked = torch.randint(max(t.numel(), 1), (40,), generator=torch.Generator().manual_seed(2))
        whole = unit_shuffle(t, torch.Generator().manual_seed(3)).reshape(-1)[picked]
        assert torch.equal(unit_shuffle_at(t, picked, torch.Generator().manual_seed(3)), whole)


def test_warning_only_when_the_verdict_is_not_transfers() -> None:
    null = {"mean": 0.5, "low": 0.499, "high": 0.501}
    agreement = {"estimate": 0.5005, "null": null}
    assert warning_line(None) is None
    assert warning_line({"verdict": "transfers", "sign_agreement": agreement}) is None
    weak = warning_line({"verdict": "weak", "recommended_method": "adaptive", "sign_agreement": agreement})
    assert weak is not None and "50.0 %" in weak and "49.9 %–50.1 %" in weak and "\n" not in weak


def _votes(grad: dict[str, torch.Tensor]) -> VoteReference:
    """Majority votes of one sample whose gradient is ``grad``."""
    counts = {n: torch.sign(-g).to(torch.int8) for n, g in grad.items()}
    return VoteReference([SignVotes(counts, grad, 1, "majority", {n: 1 for n in grad})])


def test_verdict_from_votes_against_its_null() -> None:
    generator = torch.Generator().manual_seed(0)
    tau = {"w": torch.randn(300, 200, generator=generator), "b": torch.randn(300, generator=generator)}
    shapes = {n: tuple(t.shape) for n, t in tau.items()}
    noise = {n: torch.randn(t.shape, generator=generator) for n, t in tau.items()}
    related = _votes({n: -(0.3 * tau[n] + noise[n]) for n in tau})  # votes lean towards τ's signs
    found = verdict_from_votes(TauRows(tensors=tau), list(tau), shapes, related, seed=1, coordinates=5000)
    assert found.verdict == "transfers" and found.aligned is None
    null = found.record["sign_agreement"]["null"]
    assert null["coordinates"] <= 5000 and null["permutations"] == 20
    assert found.record["sign_agreement"]["estimate"] > 0.55 > null["high"]
    unrelated = _votes(noise)
    again = verdict_from_votes(TauRows(tensors=tau), list(tau), shapes, unrelated, seed=1)
    assert again.verdict == "nothing-transfers" and again.record["note"]
    assert (
        again.record == verdict_from_votes(TauRows(tensors=tau), list(tau), shapes, unrelated, seed=1).record
    )
    # τ of one sign: every shuffle is the same, so the null on a sample has no spread
    ones, grad = {"v": torch.ones(10)}, {"v": -torch.tensor([1.0] * 6 + [-1.0] * 4)}
    lone = verdict_from_votes(TauRows(tensors=ones), ["v"], {"v": (10,)}, _votes(grad), 0, coordinates=2)
    json.dumps(lone.record, allow_nan=False)  # non-finite statistics are written as null
    assert lone.record["sign_agreement"]["null"]["sd"] == 0 and lone.record["sign_agreement"]["z"] is None


def test_tau_is_not_read_whole_when_rebasin_cannot_apply(models: dict[str, Path], tmp_path: Path) -> None:
    """Re-basin asked for a layout it cannot permute: the reason comes from the headers, and τ_A is
    read one tensor at a time for the agreement only, never gathered whole for re-basin (on a large
    model that gathering held a second copy of the task vector)."""
    generator = torch.Generator().manual_seed(0)
    tau = {"w": torch.randn(30, 20, generator=generator)}
    unrelated = _votes({"w": torch.randn(30, 20, generator=generator)})

    reads: list[str] = []

    class Counted(TauRows):
        def whole(self, name: str, shape: Any) -> torch.Tensor:
            reads.append(name)
            return super().whole(name, shape)

    weights = tmp_path / "weights.safetensors"  # no config: re-basin does not apply
    weights.symlink_to(models["A"] / "model.safetensors")
    found = verdict_from_votes(Counted(tensors=tau), ["w"], {"w": (30, 20)}, unrelated, 1, (weights, weights))
    assert found.record["rebasin"]["tried"] is False
    assert "num_heads" in found.record["rebasin"]["reason"] and found.aligned is None
    assert reads == ["w"]  # the agreement's own read; none for re-basin
