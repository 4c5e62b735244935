"""The cross-width section of the results page on hand-made raw rows (experiments/report.py), and
the text experiment's draws (experiments/crosswidth_text.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from crosswidth_text import draw_texts
from report import crosswidth_section


def _record(caption: str | None) -> dict:
    rows = [
        {"scenario": "text-narrow", "task": "headlines", "method": "zero-shot B", "test": 0.5, "alpha": None},
        {"scenario": "text-narrow", "task": "headlines", "method": "fine-tuned B", "test": 0.9, "alpha": 1.0},
    ]
    rows += [
        {"scenario": "text-narrow", "task": "headlines", "method": "Theseus (activations)", "k": 5,
         "seed": seed, "test": test, "alpha": alpha}
        for seed, test, alpha in ((0, 0.6, 0.5), (1, 0.8, 1.0))
    ]  # fmt: skip
    record = {"rows": rows, "alphas": [0, 0.5, 1]}
    return {**record, "caption": caption} if caption else record


def test_section_states_the_caption_the_gap_closed_and_the_alphas() -> None:
    text = crosswidth_section([_record("A's task vector onto a narrower encoder")])
    assert "**text-narrow**: A's task vector onto a narrower encoder (Theseus centring off" in text
    line = next(row for row in text.splitlines() if row.startswith("| Theseus (activations) k=5"))
    assert "70.0 ± 10.0" in line and "| 50 % |" in line and line.endswith("| 0.5, 1 |")
    assert "| fine-tuned B | 90.0 | 100 % | 1 |" in text
    assert "width-32 CNN" in crosswidth_section([_record(None)])  # the vision records' default


def test_text_draws_are_seeded_and_sorted() -> None:
    first = draw_texts(1000, 64, seed=1)
    assert first == draw_texts(1000, 64, seed=1) and first == sorted(first) and len(set(first)) == 64
    assert first != draw_texts(1000, 64, seed=2)
