"""``gradfix check``: drift, sign agreement against its null and bootstrap, the verdict; writes nothing.

Tiny BERTs: ``A``, its fine-tune ``A-ft`` (a few gradient steps on the topic task, so ``τ_A`` is a
task-like update), ``B-near`` (``A`` plus small noise), ``B-far`` (another seed), ``B-perm``
(``B-near`` with its residual stream and FFN units permuted: the same function on other
coordinates) and ``A-shuf`` (``A`` plus ``τ_A`` shuffled within each tensor).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from check_models import finetune, permuted, save_like
from cli_checks import file_hashes, one_error_line
from tiny_models import (
    load_saved_model,
    make_adapter,
    make_tiny_bert,
    perturbed_copy,
    topic_examples,
    write_jsonl,
)

from gradfix.cli.check_cmd import print_report
from gradfix.cli.config import validated_options
from gradfix.cli.fields import CHECK_FROM_TRANSPORT, command_options
from gradfix.cli.main import main
from gradfix.jobs.check import check_transport
from gradfix.jobs.check_stats import (
    bootstrap_agreements,
    resample_weights,
    sample_coordinates,
    unit_shuffle,
)
from gradfix.jobs.check_verdict import FINE_TUNE_B, MIN_EXCESS, Agreement, CheckStatistics, decide
from gradfix.settings import CheckSettings, VoteSettings

SHOTS = 2


def _shuffled_task_vector(base: Path, finetuned: Path, out: Path, seed: int) -> Path:
    """``base + τ`` with ``τ = finetuned − base`` shuffled within each tensor."""
    a, ft = load_saved_model(base).state_dict(), load_saved_model(finetuned)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in ft.state_dict().items():
        if t.is_floating_point():
            tau = (t - a[name]).reshape(-1)
            t = a[name] + tau[torch.randperm(tau.numel(), generator=generator)].reshape(t.shape)
        state[name] = t
    ft.load_state_dict(state)
    return save_like(ft, finetuned, out)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("check")
    a = make_tiny_bert(root / "A", seed=0)
    near = perturbed_copy(a, root / "B-near", 0.002, seed=5)
    return {
        "root": root,
        "A": a,
        "A-ft": finetune(a, root / "A-ft"),
        "A-shuf": _shuffled_task_vector(a, root / "A-ft", root / "A-shuf", seed=12),
        "B-near": near,
        "B-far": make_tiny_bert(root / "B-far", seed=3),
        "B-perm": permuted(near, root / "B-perm", seed=11),
        "wide": make_tiny_bert(root / "wide", seed=4, hidden=48, heads=2),
        "few": write_jsonl(root / "few.jsonl", topic_examples(4, seed=0)),
    }


def _check(m: dict[str, Path], target: str, finetuned: str = "A-ft", **settings: Any) -> dict[str, Any]:
    votes = VoteSettings(data=str(m["few"]), shots=SHOTS, progress=False)
    return check_transport(
        m["A"], m[finetuned], m[target], votes, CheckSettings(**settings), exclude=["pooler.*"]
    )


def _argv(m: dict[str, Path], *extra: str, **roles: Path) -> list[str]:
    paths = {"A": m["A"], "A-ft": m["A-ft"], "B": m["B-near"], "few": m["few"], **roles}
    return [
        "check",
        "--source-base", str(paths["A"]),
        "--source-finetuned", str(paths["A-ft"]),
        "--target-base", str(paths["B"]),
        "--data", str(paths["few"]),
        "--shots", str(SHOTS),
        "--exclude", "pooler.*",
        "--no-progress",
        *extra,
    ]  # fmt: skip


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


# -- the scenarios --------------------------------------------------------------------------------
def test_near_release_transfers_json_and_writes_nothing(
    models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    before, hashes = _listing(models["root"]), file_hashes(models["root"])
    assert main(_argv(models, "--json")) == 0
    record = json.loads(capsys.readouterr().out)
    assert _listing(models["root"]) == before and file_hashes(models["root"]) == hashes
    assert {"drift", "sign_agreement", "verdict", "recommended_method", "first_order"} <= set(record)
    agreement, null = record["sign_agreement"], record["sign_agreement"]["null"]
    assert {"estimate", "low", "high"} <= set(agreement)
    assert 0 < record["drift"] < 0.1  # noise of 0.002 on weights of std 0.02
    assert agreement["low"] < agreement["estimate"] < agreement["high"]
    assert agreement["estimate"] > null["high"] and agreement["low"] > null["mean"]
    assert record["verdict"] == "transfers"
    assert record["recommended_method"] in ("naive", "adaptive")
    assert record["rebasin"]["tried"] is False
    assert record["first_order"]["masked"] < 0
    assert record["data"]["num_samples"] == 3 * SHOTS
    print_report(record)  # the human-readable report of the same record
    shown = capsys.readouterr().out
    assert "verdict" in shown and "transfers" in shown and "drift" in shown


def test_independent_base_nothing_transfers(models: dict[str, Path]) -> None:
    record = _check(models, "B-far")
    agreement, null = record["sign_agreement"], record["sign_agreement"]["null"]
    assert record["drift"] > 0.2  # independent initialisations (norm weights and biases alike)
    assert null["low"] <= agreement["estimate"] <= null["high"]
    assert record["verdict"] == "nothing-transfers"
    assert record["recommended_method"] == FINE_TUNE_B
    assert record["rebasin"]["tried"] is True  # tried, and did not help either
    assert not math.isnan(record["rebasin"]["sign_agreement"]["estimate"])


def test_shuffled_task_vector_lies_inside_the_null_band(models: dict[str, Path]) -> None:
    record = _check(models, "B-near", finetuned="A-shuf", rebasin="never")
    agreement, null = record["sign_agreement"], record["sign_agreement"]["null"]
    assert null["low"] <= agreement["estimate"] <= null["high"], (agreement, null)
    assert record["verdict"] == "nothing-transfers"
    assert record["rebasin"] == {"tried": False, "reason": "--rebasin never"}


def test_permuted_release_recommends_transfusion(models: dict[str, Path]) -> None:
    record = _check(models, "B-perm")
    direct, aligned = record["sign_agreement"], record["rebasin"]["sign_agreement"]
    assert aligned["estimate"] > direct["null"]["high"]
    assert aligned["estimate"] - direct["estimate"] > 0.02
    assert record["verdict"] == "permutation"
    assert record["recommended_method"] == "transfusion"


def test_a_lora_adapter_is_checked_on_its_modules(models: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("peft")
    make_adapter(models["A"], tmp_path / "adapter")
    models = {**models, "adapter": tmp_path / "adapter"}
    record = _check(models, "B-near", finetuned="adapter", rebasin="never")
    tensors = record["sign_agreement"]["tensors"]
    assert tensors and all(n.endswith(("query.weight", "value.weight")) for n in tensors)
    assert record["sign_agreement"]["compared"] > 0
    assert len(record["drift_tensors"]) > len(tensors)  # the drift covers every selected tensor


# -- bad input -------------------------------------------------------------------------------------
def test_bad_input_is_one_line_and_exit_2(
    models: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    m = models
    no_data = [a for a in _argv(m) if a not in ("--data", str(m["few"]))]
    assert "--data" in one_error_line(no_data, capsys, "check")
    assert "nowhere" in one_error_line(_argv(m, A=tmp_path / "nowhere"), capsys, "check")
    assert "wide" in one_error_line(_argv(m, B=m["wide"]), capsys, "check")  # other shapes
    assert "--bootstrap" in one_error_line(_argv(m, "--bootstrap", "0"), capsys, "check")
    assert "--permutations" in one_error_line(_argv(m, "--permutations", "1"), capsys, "check")
    assert "--rebasin" in one_error_line(_argv(m, "--rebasin", "sometimes"), capsys, "check")
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"text": "a ball game", "label": 3.5}])
    assert "unknown.jsonl" in one_error_line(_argv(m, few=unknown), capsys, "check")
    assert "all zeros" in one_error_line(_argv(m, **{"A-ft": m["A"]}), capsys, "check")
    one_class = write_jsonl(tmp_path / "one.jsonl", topic_examples(3, seed=0, labels=["sports"]))
    assert "two labels" in one_error_line(_argv(m, few=one_class), capsys, "check")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl", "unknown.jsonl"]


def test_options_are_the_transports_and_read_from_config(tmp_path: Path) -> None:
    check, transport = command_options("check"), command_options("transport")
    assert all(check[key] == transport[key] for key in CHECK_FROM_TRANSPORT)
    options = validated_options("check", ["--shots", "3"], {"shots": 5, "bootstrap": 50, "rebasin": "never"})
    assert (options["shots"], options["bootstrap"], options["rebasin"]) == (3, 50, "never")
    assert options["permutations"] == CheckSettings().permutations


# -- the statistics --------------------------------------------------------------------------------
def test_unit_shuffle_permutes_rows_and_columns() -> None:
    t = torch.arange(12.0).reshape(3, 4)
    shuffled = unit_shuffle(t, torch.Generator().manual_seed(0))
    rows = {tuple(sorted(r.tolist())) for r in shuffled}
    assert rows == {tuple(sorted(r.tolist())) for r in t}  # each row keeps its values
    cols = {tuple(sorted(c.tolist())) for c in shuffled.T}
    assert cols == {tuple(sorted(c.tolist())) for c in t.T}
    vector = torch.arange(10.0)
    assert sorted(unit_shuffle(vector, torch.Generator().manual_seed(0)).tolist()) == vector.tolist()


def test_resamples_keep_the_classes_and_the_votes_reweight_exactly() -> None:
    labels = ["a", "a", "b", "b", "b"]
    weights, stratified = resample_weights(labels, 50, torch.Generator().manual_seed(0))
    assert stratified and weights.shape == (50, 5)
    assert torch.all(weights[:, :2].sum(dim=1) == 2) and torch.all(weights[:, 2:].sum(dim=1) == 3)
    _, stratified = resample_weights(["a", "b", "b"], 4, torch.Generator().manual_seed(0))
    assert not stratified  # one shot of "a": resampled over all shots
    grads = torch.randn(5, 1000, generator=torch.Generator().manual_seed(1))
    tau_sign = torch.sign(torch.randn(1000, generator=torch.Generator().manual_seed(2))).to(torch.int8)
    ones = torch.ones(1, 5)
    (agreement,) = bootstrap_agreements(grads, [tau_sign], ones, "majority")
    vote = torch.sign(torch.sign(-grads).sum(dim=0)).to(torch.int8)
    both = (vote != 0) & (tau_sign != 0)
    assert float(agreement[0]) == pytest.approx(float((vote == tau_sign)[both].double().mean()))


def test_sampled_coordinates_follow_the_budget() -> None:
    generator = torch.Generator().manual_seed(0)
    assert {n: len(i) for n, i in sample_coordinates({"x": 5, "y": 3}, 100, generator).items()} == {
        "x": 5,
        "y": 3,
    }
    picked = sample_coordinates({"x": 9000, "y": 1000}, 1000, generator)
    assert Counter({n: len(i) for n, i in picked.items()}) == Counter({"x": 900, "y": 100})
    assert int(picked["y"].max()) < 1000


# -- the verdict -----------------------------------------------------------------------------------
def _agreement(estimate: float, se: float = 0.01, chance: float = 0.5, sd: float = 0.002) -> Agreement:
    return Agreement(estimate, se, chance, sd)


def test_verdict_rules() -> None:
    clear, weak, none = _agreement(0.56), _agreement(0.506, se=0.02), _agreement(0.501)
    assert decide(CheckStatistics(clear, naive_inner=-1.0)).recommended_method == "naive"
    assert decide(CheckStatistics(clear, naive_inner=+1.0)).recommended_method == "adaptive"
    assert decide(CheckStatistics(weak, naive_inner=-1.0)).verdict == "weak"
    assert decide(CheckStatistics(none, naive_inner=-1.0)).verdict == "nothing-transfers"
    permuted = decide(CheckStatistics(none, -1.0, aligned=clear))
    assert (permuted.verdict, permuted.recommended_method) == ("permutation", "transfusion")
    assert decide(CheckStatistics(none, -1.0, aligned=none)).recommended_method == FINE_TUNE_B
    # many standard deviations, but less than MIN_EXCESS above chance: not "transfers"
    tiny = _agreement(0.5 + MIN_EXCESS / 2, se=1e-5, sd=1e-5)
    assert decide(CheckStatistics(tiny, -1.0)).verdict == "weak"
    # a shot draw that could fall to chance: not "transfers" either
    assert decide(CheckStatistics(_agreement(0.52, se=0.02), -1.0)).verdict == "weak"


def test_a_permutation_wins_over_a_small_clear_agreement() -> None:
    """A permuted release: τ_A clearly but barely above chance as it is (its residual stream still
    lines up), far above after re-basin. Re-basin is tried (not strong) and the verdict is the
    permutation; a strong direct agreement needs no re-basin, and an equal one after it is no
    permutation."""
    permuted = _agreement(0.5066, se=0.0008, chance=0.5002, sd=0.0004)  # the permuted MiniLM release
    assert not permuted.clear and permuted.z > 3  # many sds above chance, under 1 point
    small = _agreement(0.5130, se=0.0008, chance=0.5002, sd=0.0004)
    assert small.clear and not small.strong
    after = _agreement(0.540, se=0.004, chance=0.5002, sd=0.0004)
    for direct in (permuted, small):
        verdict = decide(CheckStatistics(direct, -0.1, aligned=after))
        assert (verdict.verdict, verdict.recommended_method) == ("permutation", "transfusion")
    assert decide(CheckStatistics(small, -0.1)).verdict == "transfers"  # re-basin not tried
    assert decide(CheckStatistics(permuted, -0.1)).verdict == "weak"
    strong = _agreement(0.540, se=0.004, chance=0.5002, sd=0.0004)
    assert strong.strong
    same = decide(
        CheckStatistics(strong, -1.4, aligned=_agreement(0.541, se=0.004, chance=0.5002, sd=0.0004))
    )
    assert same.verdict == "transfers"
