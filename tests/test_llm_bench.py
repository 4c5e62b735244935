"""The LLM-shaped benchmark's pieces at its tiny size: models the causal-lm recipe loads, a task
vector only on the projections, a transport that runs on them, and the vote figures it prints."""

from __future__ import annotations

import importlib.util
import json
import sys
from argparse import Namespace
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file

from gradfix.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("llm_transport", ROOT / "benchmarks" / "llm_transport.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, dict[str, Path], Path, int]:
    bench = _bench()
    root = tmp_path_factory.mktemp("llm")
    paths, words, numel = bench.write_models(root, "tiny", rank=4, seed=0)
    data = bench.write_data(root / "data.jsonl", words, samples=4, tokens=6, seed=0)
    return bench, paths, data, numel


def test_the_task_vector_is_low_rank_on_the_projections_only(built) -> None:
    bench, paths, _, numel = built
    a, tuned, b = (load_file(str(paths[k] / "model.safetensors")) for k in ("A", "A-ft", "B"))
    assert sum(t.numel() for t in a.values()) == numel and set(a) == set(tuned) == set(b)
    changed = {n for n in a if not torch.equal(a[n], tuned[n])}
    assert changed == {n for n in a if n.split(".")[-2] in bench.PROJECTIONS}
    assert len(changed) == 2 * len(bench.PROJECTIONS)  # two layers
    for name in changed:
        delta = tuned[name].double() - a[name].double()  # B·A, up to float32 rounding
        assert int(torch.linalg.matrix_rank(delta, rtol=1e-3)) == 4
    assert all(not torch.equal(a[n], b[n]) for n in a)  # B moved everywhere, a little
    assert max(float((a[n] - b[n]).abs().max() / a[n].abs().max().clamp_min(1e-12)) for n in a) < 0.05


def test_a_transport_of_the_benchmark_runs(built, tmp_path: Path) -> None:
    bench, paths, data, _ = built
    out = tmp_path / "out"
    assert main(bench.transport_args(paths, data, 4, out, all_tensors=False)) == 0
    record = json.loads((out / "gradfix.json").read_text())
    assert record["data"]["num_samples"] == 4 and record["method"] == "gradfix"
    written = load_file(str(out / "model.safetensors"))
    base = load_file(str(paths["B"] / "model.safetensors"))
    moved = {n for n in base if not torch.equal(base[n], written[n])}
    assert moved and all(n.endswith("_proj.weight") for n in moved)


@pytest.mark.parametrize("force_tiles", [False, True])
def test_the_vote_figures(built, monkeypatch: pytest.MonkeyPatch, force_tiles: bool) -> None:
    bench, paths, data, _ = built
    if force_tiles:
        monkeypatch.setenv("GRADFIX_TILES", "1")
    args = Namespace(dtype="float32", all_tensors=False, batch_size=2, engine="auto", rounds=1)
    timing = bench.time_votes(paths["B"], data, args, torch.device("cpu"))
    projections = 2 * len(bench.PROJECTIONS)
    assert timing["samples"] == 4 and timing["voting_params"] > 0
    # int8 counters while voting (4 samples, known before the vote), counts only (as the
    # transport keeps): 1 byte per voting parameter, returned as they are
    assert timing["state_bytes"] == timing["voting_params"] and timing["count_dtype"] == "torch.int8"
    assert timing["returned_bytes"] == timing["voting_params"]
    assert timing["batched"] > 0 and timing["votes"] > 0 and timing["ratio"] > 0
    assert timing["paths"].endswith("(calls per linear weight and batch)")
    counted = sum(int(part.split()[-1]) for part in timing["paths"].split(" (")[0].split(", "))
    assert counted == projections * 2  # every projection, in each of the two batches, by one path


def _rss_phases() -> ModuleType:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import rss_phases
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return rss_phases


def test_the_transport_phases_and_the_activations_are_measured(built, tmp_path: Path, capfd) -> None:
    """In this process (the benchmark runs them in fresh ones): the same functions, printed the same."""
    bench, paths, data, _ = built
    rss = _rss_phases()
    out = tmp_path / "out"
    capfd.readouterr()
    assert rss._command(bench.transport_args(paths, data, 4, out, all_tensors=False)) == 0
    measured = rss.parse(capfd.readouterr().err)
    assert (out / "gradfix.json").is_file()
    labels = [p.label for p in measured.phases]
    voting = [label for _, _, label in rss.PHASES if not label.startswith("fine-tune")]
    assert labels == voting  # each phase once, in the job's order
    assert all(0 < p.start <= p.peak <= measured.peak and p.end <= p.peak for p in measured.phases)
    import gradfix.jobs.common

    assert not hasattr(gradfix.jobs.common.estimate_signs, "__wrapped__")  # restored
    assert rss._activations(str(paths["B"]), str(data), 4, all_tensors=False) == 0
    loaded, passed = rss.parse(capfd.readouterr().err).phases
    assert (loaded.label, passed.label) == ("loaded", "pass")
    assert 0 < loaded.start < passed.peak  # one batched pass holds its activations above the model
    lines = rss.phase_lines(measured.phases, 2**20, "MiB")
    assert len(lines) == len(labels) and lines[0].startswith("scan τ_A") and lines[0].endswith("MiB")


def test_the_fine_tune_phases_are_measured_with_fine_tune_signs(built, tmp_path: Path, capfd) -> None:
    bench, paths, data, _ = built
    rss = _rss_phases()
    out = tmp_path / "out"
    capfd.readouterr()
    args = bench.transport_args(paths, data, 4, out, all_tensors=False, signs="finetune")
    assert "--signs" in args and "--alpha" not in args
    assert rss._command(args) == 0
    labels = [p.label for p in rss.parse(capfd.readouterr().err).phases]
    assert labels.count("fine-tune (every shot)") == 1 and labels.count("fine-tune (a fold)") == 2
    record = json.loads((out / "gradfix.json").read_text())
    assert record["signs"]["from"] == "finetune" and record["method"] == "adaptive"
