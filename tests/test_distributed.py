"""Data-parallel votes: 2 processes with gloo give the votes of one process on all examples."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from gradfix import SignVotes, estimate_signs
from gradfix.votes.distributed import all_reduce_votes, shard

WORKER = Path(__file__).parent / "workers" / "distributed_vote.py"


def test_two_gloo_processes_equal_one_process(tmp_path) -> None:
    sys.path.insert(0, str(WORKER.parent))
    from distributed_vote import build, loss

    out = tmp_path / "votes.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(WORKER),
        str(out),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    together = SignVotes.load(out)
    model, samples = build()
    alone = estimate_signs(model, samples, loss, progress=False)
    assert together.num_samples == alone.num_samples == 23
    assert together.hits == alone.hits
    for name in alone.counts:
        assert torch.equal(together.counts[name], alone.counts[name]), name
        torch.testing.assert_close(together.grad_sum[name], alone.grad_sum[name])
    # votes without gradient sums add up too
    counts_only = SignVotes.load(tmp_path / "votes-counts.safetensors")
    assert counts_only.grad_sum == {} and counts_only.hits == alone.hits
    for name in alone.counts:
        assert torch.equal(counts_only.counts[name], alone.counts[name]), name


def test_without_a_process_group_nothing_changes() -> None:
    votes = SignVotes({"w": torch.tensor([1, -2], dtype=torch.int8)}, {"w": torch.tensor([0.5, 1.0])}, 3)
    assert all_reduce_votes(votes) is votes
    assert shard(list(range(7)), 1, 3) == [1, 4]


def test_cli_transport_under_torchrun_writes_the_single_process_result(tmp_path) -> None:
    from tiny_models import make_tiny_bert, perturbed_copy, topic_examples, write_jsonl

    a = make_tiny_bert(tmp_path / "A", seed=0)
    ft = perturbed_copy(a, tmp_path / "A-ft", 0.02, seed=1)
    b = make_tiny_bert(tmp_path / "B", seed=3)
    data = write_jsonl(tmp_path / "few.jsonl", topic_examples(6, seed=0))
    common = [
        "transport",
        "--source-base",
        str(a),
        "--source-finetuned",
        str(ft),
        "--target-base",
        str(b),
        "--data",
        str(data),
        "--shots",
        "4",
        "--batch-size",
        "3",
        "--exclude",
        "pooler.*",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "gradfix.cli.main", *common, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "gradfix.cli.main",
        *common,
        "--out",
        str(tmp_path / "two"),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    one = (tmp_path / "one" / "model.safetensors").read_bytes()
    two = (tmp_path / "two" / "model.safetensors").read_bytes()
    assert one == two
    import json

    record = json.loads((tmp_path / "two" / "gradfix.json").read_text())
    assert record["num_samples"] == 12
