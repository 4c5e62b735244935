"""The build-spread experiment's page section and manifest reading (experiments/build_*.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from build_spread import built_with
from build_table import build_spread_section


def _rows(build: str, drift: float, naive: float) -> list[dict]:
    common = {"scenario": "s", "task": "t", "build": build, "build_threads": 2, "drift": drift}
    return [
        {**common, "method": "zero-shot B", "test": 0.2},
        {**common, "method": "fine-tuned B", "test": 0.8},
        {**common, "method": "naive", "test": naive, "alpha": 5.0},
        {**common, "method": "oracle mask", "test": 0.74, "alpha": 3.0},
    ]


def test_each_build_gets_its_drift_and_gap_shares_and_the_table1_build_is_set_beside(tmp_path: Path) -> None:
    result = {
        "scenario": "s", "tasks": ["t"], "command": "python experiments/build_spread.py --scenario s",
        "rows": _rows("2:/a", 0.1219, 0.35) + _rows("1:/b", 0.1236, 0.56),
    }  # fmt: skip
    (tmp_path / "build-spread-s.json").write_text(json.dumps(result), encoding="utf-8")
    table1 = {"scenario": "s", "tasks": ["t"], "drift": 0.1226, "rows": _rows("x", 0.0, 0.44)}
    page = build_spread_section(tmp_path, [table1])
    assert "| 2:/a | 2 | 12.19 % | 20.0 | 80.0 | 35.0 (25 %, α = 5) | 74.0 (90 %, α = 3) |" in page
    assert "| 1:/b | 2 | 12.36 % | 20.0 | 80.0 | 56.0 (60 %, α = 5) |" in page
    assert "| the Table 1 run's build (earlier) | n/a | 12.26 % | 20.0 | 80.0 | 44.0 (40 %, α = 5) |" in page
    assert "Builds with 2 thread(s) on this machine (2:/a, 1:/b) differ." in page
    result["rows"] = _rows("2:/a", 0.1219, 0.35) + _rows("2:/c", 0.1219, 0.35)
    (tmp_path / "build-spread-s.json").write_text(json.dumps(result), encoding="utf-8")
    assert "(2:/a, 2:/c) gave identical rows." in build_spread_section(tmp_path, [table1])


def test_a_build_missing_a_reference_row_is_left_out(tmp_path: Path) -> None:
    rows = [r for r in _rows("2:/a", 0.1, 0.3) if r["method"] != "oracle mask"]
    result = {"scenario": "s", "tasks": ["t"], "command": "c", "rows": rows}
    (tmp_path / "build-spread-s.json").write_text(json.dumps(result), encoding="utf-8")
    assert build_spread_section(tmp_path, []) == ""


def test_built_with_reads_the_threads_and_key_of_b_from_the_manifest(tmp_path: Path) -> None:
    manifest = {"entries": {"B": {"key": "abc123", "torch_threads": 1}, "A": {"key": "z"}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    assert built_with(tmp_path) == {"B_key": "abc123", "build_threads": 1}
