"""The results page states which α grid a result ran with, and never mixes two grids in a margin."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from aggregate import grid_grown, grid_note
from envs import best_on_validation
from estimator_table import DEFAULT_ROW, estimator_rows

FIXED = {"0": 0.2, "1": 0.3, "2": 0.4}
GROWN = {**FIXED, "3": 0.5, "4": 0.45}


def _result(curve: dict[str, float], alpha: float) -> dict:
    rows = [
        {"task": "t", "method": "zero-shot B", "test": 0.2},
        {"task": "t", "method": "fine-tuned B", "test": 0.8},
        {"task": "t", "method": "naive", "test": 0.4, "alpha": alpha, "validation_by_alpha": curve},
        {"task": "t", "method": "oracle mask", "test": 0.6, "alpha": alpha, "validation_by_alpha": curve},
        {"task": "t", "method": "GradFix", "k": 1, "test": 0.3, "alpha": 1.0, "validation_by_alpha": curve},
    ]
    return {"rows": rows, "tasks": ["t"], "ks": [1]}


def test_a_result_run_before_the_grid_grew_says_so_only_where_a_row_chose_two() -> None:
    fixed, grown = _result(FIXED, 2.0), _result(GROWN, 3.0)
    assert not grid_grown(fixed) and grid_grown(grown)
    note = grid_note(fixed)
    assert note is not None and "2 row(s) chose α = 2" in note
    assert grid_note(grown) is None
    assert grid_note(_result(FIXED, 1.0)) is None  # nothing chose the top: the grid did not bind


def test_the_default_row_is_set_against_naive_and_oracle_of_the_same_grid_only() -> None:
    floors_fixed = {"rows": [{"task": "t", "method": DEFAULT_ROW, "k": 1, "test": 0.5, "alpha": 2.0}]}
    floors_grown = {"rows": [{"task": "t", "method": DEFAULT_ROW, "k": 1, "test": 0.5, "alpha": 4.0}]}
    names = [row[0] for row in estimator_rows(_result(FIXED, 2.0), [floors_fixed])]
    assert names[-1] != "GradFix" and len(names) == 2  # GradFix, then the default
    assert len(estimator_rows(_result(FIXED, 2.0), [floors_grown])) == 1  # only GradFix


def test_best_on_validation_grows_past_two_only_when_two_wins() -> None:
    def rising(t: float, a: float) -> float:
        return a if a <= 5 else -a

    assert best_on_validation(rising, [0.0]) == (0.0, 5.0)
    assert best_on_validation(lambda t, a: -abs(a - 1.0), [0.0, 0.4]) == (0.0, 1.0)
