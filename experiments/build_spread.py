"""How much a scenario's results depend on its build: the same recipe built several times.

Each ``--builds THREADS:CACHE`` builds the scenario (``--task`` only) into its own cache with that
many torch threads (what is cached there is reused: the thread count that built it is read from the
cache's manifest), then measures, with ``--threads`` threads, the rows that need no shots: zero-shot B,
fine-tuned B, naive addition and the oracle mask (α on validation), and the drift of B from A. The
recipe and its seeds are the same in every build; only the floating-point order of the training
differs (threads, kernels), which a long high-learning-rate training can amplify.

Run:  python experiments/build_spread.py --scenario text-release-far \
          --builds 2:~/.cache/gradfix 1:/tmp/gradfix-t1 2:/tmp/gradfix-t2 --out docs/results/raw
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from autochoice import task_rows
from envs import make_env, relative_drift
from records import scenario_view, setup


def built_with(view: Path) -> dict[str, object]:
    """B's artifact key and the torch threads that built it, from the scenario's manifest."""
    manifest = json.loads((view / "manifest.json").read_text(encoding="utf-8"))
    entry = manifest["entries"]["B"]
    return {"B_key": entry["key"], "build_threads": entry.get("torch_threads")}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--task", default="headlines")
    parser.add_argument(
        "--builds", nargs="+", required=True, help="THREADS:CACHE per build (a cache folder each)"
    )
    parser.add_argument("--name", help="name of the results file (default build-spread-<scenario>)")
    args, rec, scenario = setup(parser)
    rec.path = rec.path.with_name(f"{args.name or f'build-spread-{scenario.name}'}.json")
    rec.meta.update(experiment=rec.path.stem, scenario=scenario.name, tasks=[args.task])
    measure_threads = torch.get_num_threads()
    include = "encoder.*" if scenario.family == "text" else None
    for spec in args.builds:
        threads, _, cache = spec.partition(":")
        torch.set_num_threads(int(threads))
        view = scenario_view(scenario, str(Path(cache).expanduser()), [args.task])
        torch.set_num_threads(measure_threads)
        build = {"build": spec, **built_with(view), "drift": relative_drift(view, include)}
        env = make_env(view, args.task, scenario.family, "B", scenario.name)
        task_rows(env, partial(rec.add, scenario=scenario.name, task=args.task, **build), "all")
        rec.save()
        rec.log(f"build {spec}: drift {100 * build['drift']:.2f} %")


if __name__ == "__main__":
    main()
