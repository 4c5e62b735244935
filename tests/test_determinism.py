"""Determinism, provenance and resumable votes through the command line on tiny BERT models."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_bert, perturbed_copy, topic_examples, write_jsonl

from gradfix.cli.main import main
from gradfix.votes import SignVotes


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("determinism")
    a = make_tiny_bert(root / "A", seed=0)
    examples = topic_examples(8, seed=5)
    return {
        "A": a,
        "A-ft": perturbed_copy(a, root / "A-ft", 0.02, seed=1),
        "B": make_tiny_bert(root / "B", seed=3),
        "few": write_jsonl(root / "few.jsonl", topic_examples(6, seed=0)),
        "all": write_jsonl(root / "all.jsonl", examples),
        "half1": write_jsonl(root / "half1.jsonl", examples[:12]),
        "half2": write_jsonl(root / "half2.jsonl", examples[12:]),
    }


def _transport(m: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "transport",
        "--source-base", str(m["A"]),
        "--source-finetuned", str(m["A-ft"]),
        "--target-base", str(m["B"]),
        "--exclude", "pooler.*",
        "--out", str(out),
        "--no-progress",
        *extra,
    ]  # fmt: skip


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_inputs_and_seed_give_bit_identical_outputs(models, tmp_path) -> None:
    runs = [tmp_path / "run1", tmp_path / "run2", tmp_path / "seed4"]
    for out, seed in zip(runs, ("3", "3", "4"), strict=True):
        assert main(_transport(models, out, "--data", str(models["few"]), "--seed", seed)) == 0
    first, second = _files(runs[0]), _files(runs[1])
    assert set(first) >= {"model.safetensors", "gradfix.json", "zero_shot_head.safetensors", "config.json"}
    assert first == second  # every byte of every file, gradfix.json included

    record = json.loads(first["gradfix.json"])
    text = first["gradfix.json"].decode()
    assert text == json.dumps(record, indent=2, sort_keys=True) + "\n"
    assert not any(word in text.lower() for word in ("time", "date", "host", "user"))
    inputs = record["inputs"]
    assert inputs["source_base"]["sha256"] == {"model.safetensors": _sha(models["A"] / "model.safetensors")}
    assert inputs["source_finetuned"]["sha256"] == {
        "model.safetensors": _sha(models["A-ft"] / "model.safetensors")
    }
    target_files = {p.name: _sha(p) for p in models["B"].iterdir()}
    assert inputs["target_base"]["sha256"] == target_files  # weights, config and tokenizer
    assert record["data"]["sha256"] == {"few.jsonl": _sha(models["few"])}

    drawn = record["data"]["drawn_lines"]
    assert len(drawn) == 6 and len(set(drawn)) == 6
    lines = models["few"].read_text().splitlines()
    labels = [json.loads(lines[n - 1])["label"] for n in drawn]
    assert labels == sorted(labels) and len(set(labels)) == 3  # two per class, classes in order
    other = json.loads((runs[2] / "gradfix.json").read_text())
    assert other["seed"] == 4 and other["data"]["drawn_lines"] != drawn


def test_one_and_two_threads_write_the_same_bytes(models, tmp_path) -> None:
    """Votes file, gradfix.json and weights are byte-identical with 1 and 2 threads (each run in its
    own process: the thread count is read from OMP_NUM_THREADS at start, as a user would set it)."""
    written = {}
    for threads in ("1", "2"):
        run = tmp_path / f"threads{threads}"
        env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        args = _transport(models, run / "out", "--data", str(models["few"]), "--method", "gradfix")
        # 6 examples in batches of 5 and 1: the batch of one sample runs products MKL splits by thread
        args += ["--batch-size", "5", "--votes-out", str(run / "votes.safetensors")]
        code = "import sys; from gradfix.cli.main import main; sys.exit(main(sys.argv[1:]))"
        done = subprocess.run(
            [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
        written[threads] = _files(run)
    assert set(written["1"]) >= {"votes.safetensors", "out/gradfix.json", "out/model.safetensors"}
    for name, data in written["1"].items():
        assert written["2"][name] == data, name
    record = json.loads(written["1"]["out/gradfix.json"])
    assert record["num_samples"] == 6


def test_votes_split_across_runs_add_up_to_one_vote(models, tmp_path) -> None:
    halves = [
        json.loads(line)["label"] for h in ("half1", "half2") for line in models[h].read_text().splitlines()
    ]
    assert set(halves[:12]) == set(halves[12:]) == {"sports", "business", "tech"}  # the same label set
    common = ("--method", "gradfix", "--shots", "all", "--batch-size", "4")
    parts = []
    for name in ("half1", "half2"):
        votes = tmp_path / f"{name}.votes.safetensors"
        args = _transport(models, tmp_path / f"out-{name}", "--data", str(models[name]), *common)
        assert main([*args, "--votes-out", str(votes)]) == 0
        parts.append(votes)
    whole_votes = tmp_path / "whole.votes.safetensors"
    whole = _transport(models, tmp_path / "whole", "--data", str(models["all"]), *common)
    assert main([*whole, "--votes-out", str(whole_votes)]) == 0
    resumed = _transport(
        models,
        tmp_path / "resumed",
        "--method",
        "gradfix",
        "--votes-in",
        str(parts[0]),
        "--votes-in",
        str(parts[1]),
    )
    assert main(resumed) == 0

    assert (tmp_path / "resumed" / "model.safetensors").read_bytes() == (
        tmp_path / "whole" / "model.safetensors"
    ).read_bytes()
    added = SignVotes.load(parts[0]) + SignVotes.load(parts[1])
    reference = SignVotes.load(whole_votes)
    assert added.num_samples == reference.num_samples == 24 and added.hits == reference.hits
    for name, counts in reference.counts.items():
        assert torch.equal(added.counts[name].long(), counts.long()), name
        torch.testing.assert_close(added.grad_sum[name], reference.grad_sum[name], rtol=1e-4, atol=1e-5)

    record = json.loads((tmp_path / "resumed" / "gradfix.json").read_text())
    assert [v["sha256"] for v in record["votes_in"]] == [{p.name: _sha(p)} for p in parts]
    assert record["num_samples"] == 24 and "data" not in record
    first = json.loads((tmp_path / "out-half1" / "gradfix.json").read_text())
    assert first["shots"] == "all" and first["data"]["drawn_lines"] == list(range(1, 13))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files


def test_safetensors_headers_are_written_in_one_order(tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from gradfix.io import sort_safetensors_metadata

    meta = {"format": "pt", "b": 'quote " and \\ back', "é": "ünï", "ctl": "\x01\t", "n": "12"}
    digests = set()
    for i in range(8):  # safetensors orders the metadata differently from call to call
        path = tmp_path / f"{i}.safetensors"
        save_file({"w": torch.ones(3), "ids": torch.arange(2)}, str(path), metadata=meta)
        sort_safetensors_metadata(path)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
        with safe_open(str(path), "pt") as handle:
            assert handle.metadata() == meta and torch.equal(handle.get_tensor("w"), torch.ones(3))
    assert len(digests) == 1
