"""The results page's arithmetic (experiments/aggregate.py, claims.py) on hand-made raw rows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from aggregate import average, by_task, gap, label, paper_gap
from claims import default_section


def _rows() -> list[dict]:
    rows = []
    for task, zero, top in (("t1", 0.5, 0.9), ("t2", 0.6, 1.0)):
        rows += [
            {"task": task, "method": "zero-shot B", "test": zero},
            {"task": task, "method": "fine-tuned B", "test": top},
            {"task": task, "method": "naive", "test": zero + 0.2},
        ]
        for seed, delta in ((0, 0.1), (1, 0.3)):
            rows += [
                {"task": task, "method": "GradFix", "k": 2, "seed": seed, "test": zero + delta},
                {
                    "task": task,
                    "method": "adaptive (validation)",
                    "k": 2,
                    "seed": seed,
                    "test": zero + 0.25,
                    "validation": 0.8,
                },
                {
                    "task": task,
                    "method": "adaptive (shots, 1-SE)",
                    "k": 2,
                    "seed": seed,
                    "test": zero + 0.15,
                    "validation": 0.795 if seed == 0 else 0.75,
                },
            ]
    return rows


def test_average_is_the_mean_over_seeds_of_the_task_mean() -> None:
    rows = _rows()
    s = average(rows, "GradFix k=2", ["t1", "t2"])
    # seed 0: mean(0.6, 0.7) = 0.65; seed 1: mean(0.8, 0.9) = 0.85
    assert s.n == 2
    assert s.mean == pytest.approx(0.75)
    assert s.std == pytest.approx(0.10)
    assert average(rows, "naive", ["t1", "t2"]).mean == pytest.approx(0.75)
    assert average(rows, "naive", ["t1", "t2", "t3"]) is None  # a task without the method
    per_task = by_task(rows, "GradFix k=2")
    assert per_task["t1"].mean == pytest.approx(0.7) and per_task["t2"].mean == pytest.approx(0.8)


def test_labels_gaps_and_the_papers_share() -> None:
    assert label({"method": "GradFix", "k": 5}) == "GradFix k=5"
    assert label({"method": "naive"}) == "naive"
    assert label({"method": "random", "k": 5, "study": "masks"}) == "random"
    assert gap(0.7, 0.5, 0.9) == pytest.approx(0.5)
    assert paper_gap("oracle mask") == pytest.approx((85.71 - 54.45) / (94.73 - 54.45))
    assert paper_gap("no such method") is None


def test_default_section_compares_with_the_better_of_naive_and_gradfix() -> None:
    result = {"scenario": "toy", "tasks": ["t1", "t2"], "rows": _rows()}
    text = default_section([result])
    line = next(li for li in text.splitlines() if li.startswith("| toy | 2 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # naive 75.0, GradFix 75.0, better 75.0; adaptive (validation) 80.0 ≥ 75 → yes; 1-SE 70.0 → no
    assert cells[2:5] == ["75.0", "75.0", "75.0"]
    assert cells[5:7] == ["n/a", "n/a"]  # no gate rows
    assert cells[7:10] == ["80.0", "n/a", "70.0"]
    assert cells[10:] == ["yes", "**no**"]
    # validation 0.795 is within 1 point of 0.8 (seed 0), 0.75 is not (seed 1): 2 of 4 runs
    assert "adaptive (shots, 1-SE): in 50 % of 4 runs" in text
    assert "-10.0 points" in text  # shots 0.15 vs validation 0.25 above zero-shot
