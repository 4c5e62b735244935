"""Data-parallel votes: 2 processes with gloo give the votes of one process on all examples."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from gradfix import SignVotes, estimate_signs
from gradfix.distributed import all_reduce_votes, shard

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


def test_without_a_process_group_nothing_changes() -> None:
    votes = SignVotes({"w": torch.tensor([1, -2], dtype=torch.int8)}, {"w": torch.tensor([0.5, 1.0])}, 3)
    assert all_reduce_votes(votes) is votes
    assert shard(list(range(7)), 1, 3) == [1, 4]
