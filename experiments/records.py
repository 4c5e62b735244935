"""Shared plumbing of the experiment scripts: options, the scenario folder, and the raw JSON rows."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gradfix.zoo import Scenario, build_scenario, get_scenario


class Recorder:
    """Rows of one experiment, written (atomically) to ``<out>/<name>.json`` after every step."""

    def __init__(self, out: Path, name: str):
        self.path = Path(out) / f"{name}.json"
        self.rows: list[dict[str, Any]] = []
        self.start = time.perf_counter()
        self.meta: dict[str, Any] = {
            "experiment": name,
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "torch_threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__,
        }

    def add(self, **row: Any) -> None:
        """Add one row (floats rounded to 4 decimals) and print it."""
        clean = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
        self.rows.append(clean)
        shown = {k: v for k, v in clean.items() if k not in ("validation_by_alpha", "scenario", "choice")}
        print("  " + json.dumps(shown), flush=True)

    def log(self, message: str) -> None:
        """A progress line with the elapsed time."""
        print(f"[{time.perf_counter() - self.start:6.0f} s] {message}", flush=True)

    def save(self) -> Path:
        """Write everything so far (with wall time and peak RSS of the process)."""
        self.meta["wall_seconds"] = round(time.perf_counter() - self.start, 1)
        self.meta["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({**self.meta, "rows": self.rows}, indent=1) + "\n", encoding="utf-8")
        tmp.replace(self.path)
        return self.path


def setup(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, Recorder, Scenario]:
    """Add the common options, parse, set threads and seeds, and return a recorder and the scenario."""
    parser.add_argument("--out", default="docs/results/raw", help="folder of the raw JSON results")
    parser.add_argument("--cache", help="zoo cache (default $GRADFIX_CACHE or ~/.cache/gradfix)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    scenario = get_scenario(args.scenario)
    default = f"{parser.prog.removesuffix('.py')}-{scenario.name}"
    if getattr(args, "target", "B") != "B":
        default += f"-target-{args.target}"
    rec = Recorder(Path(args.out), getattr(args, "name", None) or default)
    return args, rec, scenario


def scenario_view(scenario: Scenario, cache: str | None, tasks: list[str] | None = None) -> Path:
    """Build (or reuse) the scenario in the cache, for ``tasks`` (all when empty), and return its folder."""
    return build_scenario(scenario, cache, tasks=tasks or None, progress=False)
