"""The note on several fine-tunes summed, on hand-made raw rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from claims import FINETUNE_DEFAULT_ROW
from runs_table import runs_section


def _result(name: str, drift: float, signs: float, default: float, runs: int | None = None) -> dict:
    rows = [
        {"task": "t", "method": "naive", "test": 0.30},
        {"task": "t", "method": "oracle mask", "test": 0.80},
    ]
    for seed in (0, 1):
        rows += [
            {"task": "t", "method": "fine-tune signs", "k": 2, "seed": seed, "test": signs},
            {"task": "t", "method": FINETUNE_DEFAULT_ROW, "k": 2, "seed": seed, "test": default},
        ]
    meta = {"experiment": name, "scenario": "s", "ks": [2], "drift": drift, "command": f"make {name}"}
    return {**meta, **({"finetune_runs": runs} if runs else {}), "rows": rows}


def test_several_runs_are_set_beside_the_floors_run_of_the_same_build(tmp_path) -> None:
    (tmp_path / "floors-s-t.json").write_text(json.dumps(_result("floors-s-t", 0.1, 0.40, 0.35)))
    (tmp_path / "runs3-s.json").write_text(json.dumps(_result("runs3-s", 0.1, 0.55, 0.45, runs=3)))
    text = runs_section(tmp_path)
    assert "**3 fine-tunes summed** (s, drift 10.00 %; one fine-tune: floors-s-t)" in text
    assert "| 2 | 40.0 (20 %) | 55.0 (50 %) | 35.0 (10 %) | 45.0 (30 %) |" in text
    assert "`make runs3-s`" in text
    # another build of the scenario: nothing to compare with
    (tmp_path / "runs3-s.json").write_text(json.dumps(_result("runs3-s", 0.2, 0.55, 0.45, runs=3)))
    assert runs_section(tmp_path) == ""
