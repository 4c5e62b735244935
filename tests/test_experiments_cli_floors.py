"""The floors of the default through the installed command (experiments/cli_floors.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from cli_floors import cli_floors_section, parse_runs, same_build

LINES = """command: bash experiments/cli_default.sh s
drift: 0.1219
k=2 seed=0 test_accuracy=0.50 aligned_by=None verdict=weak signs=finetune t=0.0 alpha=8.0
k=2 seed=1 test_accuracy=0.30 aligned_by=None verdict=weak signs=finetune t=2.0 alpha=5.0
"""


def _result(drift: float, naive: float) -> dict:
    rows = [
        {"task": "t", "method": "zero-shot B", "test": 0.2},
        {"task": "t", "method": "naive", "test": naive},
        {"task": "t", "method": "GradFix", "k": 2, "seed": 0, "test": 0.25},
    ]
    return {"scenario": "s", "tasks": ["t"], "drift": drift, "rows": rows}


def test_runs_are_read_and_set_against_the_references_of_their_own_build(tmp_path: Path) -> None:
    (tmp_path / "cli-default-s.txt").write_text(LINES, encoding="utf-8")
    command, runs = parse_runs(tmp_path / "cli-default-s.txt")
    assert command == "bash experiments/cli_default.sh s" and [r["seed"] for r in runs] == ["0", "1"]
    other, mine = _result(0.1226, 0.50), _result(0.1219, 0.30)
    assert same_build("s", runs, [other, mine]) is mine
    assert all(r["drift"] == "0.1219" for r in runs)
    assert same_build("s", [{"k": "2"}], [other, mine]) is other  # no drift recorded: the first
    page = cli_floors_section(tmp_path, [other, mine])
    row = "| s | 12.19 % / 12.19 % | 2 | 50.0 / 30.0 | 40.0 | none | weak | finetune |"
    assert row + " gate t=0 α=8; naive α=5 | 20.0 | 30.0 | 25.0 | n/a / n/a | met | met |" in page
    page = cli_floors_section(tmp_path, [other])  # only another build: its naive, 50.0, is missed
    assert "| 12.19 % / 12.26 % |" in page and "| 50.0 | 25.0 | n/a / n/a | met | **not met** |" in page
