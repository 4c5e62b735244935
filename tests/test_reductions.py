"""Sums whose bits do not depend on the thread count (the descent report's, the masks' statistics)."""

from __future__ import annotations

import math
import subprocess
import sys

import torch

from gradfix.ops.reductions import ordered_dot, ordered_sum

SCRIPT = """
import sys, torch
from gradfix.ops.reductions import ordered_sum
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
print(*(ordered_sum(torch.randn(n, dtype=torch.float64)).hex() for n in (100, 40_000, 1_000_003)))
"""


def test_ordered_sum_is_the_sum_to_rounding_and_exact_on_small_inputs() -> None:
    x = torch.randn(10_007, dtype=torch.float64)
    assert math.isclose(ordered_sum(x), float(x.sum()), rel_tol=1e-12, abs_tol=1e-9)
    small = torch.tensor([1e16, 1.0, -1e16])
    assert ordered_sum(small) == 1.0  # exactly rounded below one row
    a, b = torch.randn(5000), torch.randn(5000)
    assert math.isclose(ordered_dot(a, b), float((a.double() * b.double()).sum()), rel_tol=1e-12)
    assert ordered_sum(torch.zeros(0)) == 0.0


def test_ordered_sum_gives_the_same_bits_with_1_and_2_threads() -> None:
    runs = [
        subprocess.run(
            [sys.executable, "-c", SCRIPT, str(n)], capture_output=True, text=True, check=True
        ).stdout
        for n in (1, 2)
    ]
    assert runs[0] == runs[1] and len(runs[0].split()) == 3
