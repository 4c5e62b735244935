"""The floors of the default and the knowledge claim on the results page, on hand-made raw rows."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from claims import CONTROL_ROWS, DEFAULT_ROW, grid_of, knowledge_claims
from floors_table import floors_section


def _result(default: float, valid: float, controls: tuple[float, float, float]) -> dict:
    rows = []
    for task in ("t1", "t2"):
        rows += [
            {"task": task, "method": "zero-shot B", "test": 0.50},
            {"task": task, "method": "fine-tuned B", "test": 0.90},
            {"task": task, "method": "naive", "test": 0.52, "validation_by_alpha": {"0": 0.5, "0.02": 0.5}},
        ]
        for seed in (0, 1):
            rows += [
                {"task": task, "method": "GradFix", "k": 1, "seed": seed, "test": 0.60},
                {"task": task, "method": "adaptive (validation)", "k": 1, "seed": seed, "test": valid},
                {"task": task, "method": DEFAULT_ROW, "k": 1, "seed": seed, "test": default},
                *(
                    {"task": task, "method": name, "k": 1, "seed": seed, "test": value}
                    for name, value in zip(CONTROL_ROWS, controls, strict=True)
                ),
            ]
    return {
        "scenario": "s",
        "experiment": "floors-s",
        "tasks": ["t1", "t2"],
        "ks": [1],
        "seeds": [0, 1],
        "alphas": [0.0, 0.02],
        "rows": rows,
    }


def test_floors_are_met_when_the_default_keeps_up_and_named_with_numbers_when_not() -> None:
    good = floors_section([_result(default=0.595, valid=0.61, controls=(0.5, 0.5, 0.5))])
    assert "Every floor is met." in good and "**not met**" not in good
    assert "α ∈ {0, 0.02}" in good and grid_of([_result(0.5, 0.5, (0.5,) * 3)]) == "0, 0.02"
    # below zero-shot by 1 point, below GradFix (60) by 11 points, validation below GradFix
    bad = floors_section([_result(default=0.49, valid=0.58, controls=(0.5, 0.5, 0.5))])
    assert bad.count("**not met**") == 3
    kept = "s (t1, t2), k = 1: default − zero-shot B = -1.0 points; the default kept B (α = 0) in 0 of 4"
    assert kept in bad
    assert "s (t1, t2), k = 1: default − better = -11.0 points;" in bad
    assert "adaptive (validation) − better = -2.0 points;" in bad
    assert bad.count("refuses to cross-validate one shot per class") == 2  # k = 1: the CLI's path
    assert "whose row here misses its floor" in bad
    assert "| -1.0 |" in bad  # the worst task's margin over zero-shot B


def test_knowledge_claim_holds_only_when_gradfix_beats_the_controls_without_tau_values() -> None:
    # GradFix closes 25 % of the gap (60 vs 50 → 90); controls 5 %, 10 % and 20 %
    holds = knowledge_claims([_result(0.6, 0.6, controls=(0.52, 0.54, 0.58))])
    assert len(holds) == 1 and ": holds (GradFix +15 points" in holds[0]
    assert (
        "random task vector 5 %, the sign step 10 %, τ_A's magnitudes shuffled under GradFix's signs 20 %"
        in (holds[0])
    )
    # the sign step does as well as GradFix: the gain is B's own gradient step
    fails = knowledge_claims([_result(0.6, 0.6, controls=(0.52, 0.592, 0.58))])
    assert "**does not hold** (GradFix +2 points" in fails[0]
    assert knowledge_claims([{**_result(0.6, 0.6, (0.5,) * 3), "rows": []}]) == []


def test_a_floors_run_without_references_borrows_them_from_its_table1() -> None:
    from floors_table import borrow_references

    full = _result(default=0.595, valid=0.61, controls=(0.5, 0.5, 0.5))
    shots_only = {
        **full,
        "tasks": ["t1"],
        "seeds": [0],
        "alphas": [0.0, 0.02],
        "rows": [
            r for r in full["rows"] if r["method"] == DEFAULT_ROW and r["task"] == "t1" and r["seed"] == 0
        ],
    }
    merged = borrow_references(
        shots_only,
        [
            {
                **full,
                "rows": full["rows"] + [{"task": "t1", "method": "GradFix", "k": 9, "seed": 0, "test": 0.1}],
            }
        ],
    )
    methods = sorted({r["method"] for r in merged["rows"]})
    assert methods == sorted(
        [DEFAULT_ROW, "zero-shot B", "fine-tuned B", "naive", "GradFix", "adaptive (validation)"]
    )
    assert all(
        r["task"] == "t1" and r.get("seed") in (None, 0) and r.get("k") in (None, 1) for r in merged["rows"]
    )
    assert merged["references"] == "Table 1 run (α ∈ {0, 0.02})"
    assert "| s (t1) | Table 1 run (α ∈ {0, 0.02}) | 1 |" in floors_section([merged])
    assert borrow_references(full, [])["references"] == "this run"


def test_a_lean_run_without_a_validation_choice_checks_the_other_two_floors() -> None:
    full = _result(default=0.49, valid=0.61, controls=(0.5, 0.5, 0.5))
    lean = {**full, "rows": [r for r in full["rows"] if r["method"] != "adaptive (validation)"]}
    text = floors_section([lean])
    assert (
        text.count("**not met**") == 2 and "| n/a | 49.0 | -1.0 | **not met** | **not met** | n/a |" in text
    )


def test_a_run_with_some_references_of_its_own_borrows_none() -> None:
    from floors_table import borrow_references

    full = _result(default=0.5, valid=0.61, controls=(0.5, 0.5, 0.5))
    lean = {**full, "rows": [r for r in full["rows"] if r["method"] != "adaptive (validation)"]}
    kept = borrow_references(lean, [full])
    assert kept["references"] == "this run" and kept["rows"] == lean["rows"]


def test_floors_read_the_fine_tune_sign_default_where_a_run_measured_it() -> None:
    from claims import FINETUNE_DEFAULT_ROW
    from floors_table import FINETUNE_VALIDATION_ROW

    result = _result(default=0.40, valid=0.40, controls=(0.5, 0.5, 0.5))
    votes_only = floors_section([result])
    assert votes_only.count("**not met**") == 3 and "| votes |" in votes_only
    extra = [
        {
            **r,
            "method": {DEFAULT_ROW: FINETUNE_DEFAULT_ROW}.get(r["method"], FINETUNE_VALIDATION_ROW),
            "test": 0.7,
        }
        for r in result["rows"]
        if r["method"] in (DEFAULT_ROW, "adaptive (validation)")
    ]
    with_finetune = floors_section([{**result, "rows": result["rows"] + extra}])
    assert "Every floor is met." in with_finetune and "| fine-tune |" in with_finetune
    assert "| 70.0 | +20.0 |" in with_finetune  # the fine-tune default, 20 points over zero-shot B
