"""`gradfix check`'s verdict on every built scenario, at the shots the experiments use.

For every scenario and task that has Table 1 results in ``docs/results/raw`` and whose ``A``,
``A-ft/<task>``, ``B`` and data are built in the zoo cache (nothing is built here: a task whose
artifacts are missing is skipped and listed in ``skipped.json``), the check runs at k = 1, 2, 5
shots per class and seeds 0, 1, 2 (the k and seeds of Table 1; each seed draws its shots):

- **text** scenarios: the ``gradfix check --json`` command itself (the installed ``gradfix``
  script next to this Python, else ``python -m gradfix.cli.main``) with the task's template and
  token limit and ``--include 'encoder.*'``, as ``experiments/cli_default.sh`` runs the transport;
- **vision** scenarios: the command line has no recipe for the zoo's CNN with its prototype head,
  so the check cannot run as a command there. The verdict comes from the same rules
  (:func:`gradfix.jobs.check_votes.verdict_from_votes`, what ``gradfix transport`` states as its
  warning): B's summed votes on the shots (:mod:`envs`), the permutation null, re-basin where the
  layout allows it; no bootstrap over the shots (the record's ``statistic`` says so).

Each run is one JSON file ``docs/results/raw/verdicts/<scenario>/<task>-k<k>-s<seed>.json`` (the
check's record without its per-tensor maps, plus ``scenario``, ``task``, ``k``, ``seed``,
``source``, ``command``, ``seconds`` and ``same_shots_as_experiments``: whether the check's shots are the
training examples the experiments draw for that k and seed). A file that exists is kept, so an
interrupted run resumes. :mod:`verdict_table` compares each verdict with what the experiments
show and writes the results page's table.

Run:  nice -n 19 python experiments/verdicts.py [--scenarios ...] [--ks 1 2 5] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from envs import draw_per_class

from gradfix.zoo import get_scenario, scenario_status
from gradfix.zoo.cache import cache_root

SCENARIOS = (
    "text-release-short",
    "text-release-long",
    "text-release-far",
    "text-release-instruct",
    "text-release-permuted",
    "vision-independent",
)
"""The scenarios with Table 1 results (their raw files ``table1-<scenario>.json``)."""
PER_TENSOR = ("drift_tensors", "tensors")
"""Keys of the check's per-tensor maps, left out of the saved records (any depth)."""


def table1_tasks(raw: Path, scenario: str) -> list[str]:
    """The tasks of ``scenario`` with Table 1 rows in ``raw`` (any ``table1-<scenario>*.json``)."""
    tasks: list[str] = []
    for path in sorted(raw.glob(f"table1-{scenario}*.json")):
        result = json.loads(path.read_text(encoding="utf-8"))
        if result.get("scenario") == scenario:
            tasks += [t for t in result["tasks"] if t not in tasks]
    return tasks


def built_folders(scenario: str, root: Path, task: str) -> dict[str, Path] | str:
    """The artifact folders the check of ``task`` needs (``A``, ``A-ft``, ``B``, ``B-ft``,
    ``data``), or which of them are not built (``B-ft`` only for the vision verdict's head-free
    environment, which loads it; the check never reads it)."""
    entries = scenario_status(get_scenario(scenario), root)["entries"]
    wanted = {"A": "A", "A-ft": f"A-ft/{task}", "B": "B", "B-ft": f"B-ft/{task}", "data": "data"}
    family = get_scenario(scenario).family
    needed = [k for k in wanted if k != "B-ft" or family == "vision"]
    missing = [wanted[k] for k in needed if not entries[wanted[k]]["built"]]
    if missing:
        return f"not built in {root}: {', '.join(missing)}"
    return {k: Path(entries[v]["folder"]) for k, v in wanted.items()}


def gradfix_command() -> list[str]:
    """The ``gradfix`` command: the script installed beside this Python, else ``-m gradfix.cli.main``."""
    script = Path(sys.executable).with_name("gradfix")
    return [str(script)] if script.exists() else [sys.executable, "-m", "gradfix.cli.main"]


def text_check(folders: dict[str, Path], task: str, k: int, seed: int) -> tuple[dict[str, Any], str]:
    """``gradfix check --json`` on a text task; returns the record and the command line."""
    info = json.loads((folders["data"] / task / "task.json").read_text(encoding="utf-8"))
    args = [
        *gradfix_command(),
        "check",
        "--source-base", str(folders["A"]),
        "--source-finetuned", str(folders["A-ft"]),
        "--target-base", str(folders["B"]),
        "--data", str(folders["data"] / task / "train.jsonl"),
        "--shots", str(k),
        "--seed", str(seed),
        "--include", "encoder.*",
        "--template", info["template"],
        "--max-length", str(info["max_length"]),
        "--no-progress",
        "--json",
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path("src").resolve()), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"gradfix check failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    return json.loads(done.stdout), shlex.join(args)


def linked_view(folders: dict[str, Path], task: str, into: Path) -> Path:
    """A scenario folder of links to the built artifacts (what :mod:`envs` reads), built nothing."""
    for entry in ("A", "B", "data"):
        (into / entry).symlink_to(folders[entry])
    for side in ("A-ft", "B-ft"):
        (into / side).mkdir()
        (into / side / task).symlink_to(folders[side])
    return into


_VISION_ENVS: dict[tuple[str, str], Any] = {}
"""Vision environments by (scenario, task), loaded once for every k and seed (their links stay)."""


def vision_check(scenario: str, folders: dict[str, Path], task: str, k: int, seed: int) -> dict[str, Any]:
    """The verdict from B's summed votes on the shots (the rules ``gradfix transport`` states)."""
    from envs import make_env, relative_drift

    from gradfix.jobs.check_votes import verdict_from_votes
    from gradfix.masking import TauRows, VoteReference

    if (scenario, task) not in _VISION_ENVS:
        links = Path(tempfile.mkdtemp(prefix="verdicts-"))
        atexit.register(shutil.rmtree, links, True)
        view = linked_view(folders, task, links)
        _VISION_ENVS[scenario, task] = (
            make_env(view, task, "vision", "B", scenario),
            relative_drift(view, None),
        )
    env, drift = _VISION_ENVS[scenario, task]
    votes = env.votes(env.shots(k, seed))
    shapes = {n: tuple(t.shape) for n, t in env.tau_a.items()}
    nonzero = [n for n, t in env.tau_a.items() if bool(t.any())]
    found = verdict_from_votes(
        TauRows(tensors=env.tau_a),
        list(env.tau_a),
        shapes,
        VoteReference([votes]),
        seed,
        (folders["A"], folders["B"]),
        nonzero=nonzero,
    )
    return {**found.record, "drift": drift, "num_samples": votes.num_samples}


def same_shots(folders: dict[str, Path], task: str, k: int, seed: int, record: dict[str, Any]) -> bool | None:
    """Whether the check voted on the examples the experiments draw for ``k`` and ``seed`` (text)."""
    from gradfix.data import load_examples

    lines = record.get("data", {}).get("drawn_lines")
    if lines is None:
        return None
    train = load_examples(folders["data"] / task / "train.jsonl")
    ours = {train[i].line for i in draw_per_class([ex.label for ex in train], k, seed)}
    return ours == set(lines)


def strip(value: Any) -> Any:
    """``value`` without the per-tensor maps (:data:`PER_TENSOR`), at any depth."""
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in PER_TENSOR}
    return value


def run_one(
    scenario: str, family: str, folders: dict[str, Path], task: str, k: int, seed: int
) -> dict[str, Any]:
    """One check, as the record saved for it."""
    start = time.perf_counter()
    if family == "text":
        record, command = text_check(folders, task, k, seed)
        source = "gradfix check --json"
        same = same_shots(folders, task, k, seed, record)
    else:
        record, same = vision_check(scenario, folders, task, k, seed), True
        command = f"python experiments/verdicts.py --scenarios {scenario} --ks {k} --seeds {seed}"
        source = (
            "the verdict `gradfix transport` states, from B's summed votes on the shots "
            "(`verdict_from_votes`: permutation null, no bootstrap over the shots), since the command "
            "line has no recipe for the zoo's CNN and its prototype head"
        )
    return {
        "scenario": scenario,
        "task": task,
        "k": k,
        "seed": seed,
        "source": source,
        "command": command,
        "same_shots_as_experiments": same,
        "seconds": round(time.perf_counter() - start, 1),
        **strip(record),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    parser.add_argument("--tasks", nargs="*", help="only these (default: every task with Table 1 results)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--raw", default="docs/results/raw")
    parser.add_argument("--cache", help="zoo cache (default $GRADFIX_CACHE or ~/.cache/gradfix)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (vision verdicts)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    raw, root = Path(args.raw), cache_root(args.cache)
    out = raw / "verdicts"
    skipped: dict[str, str] = {}
    for scenario in args.scenarios:
        family = get_scenario(scenario).family
        for task in table1_tasks(raw, scenario):
            folders = built_folders(scenario, root, task)
            if isinstance(folders, str) or (args.tasks and task not in args.tasks):
                why = folders if isinstance(folders, str) else "built; not checked in this run (--tasks)"
                skipped[f"{scenario}/{task}"] = why
                print(f"{scenario}/{task}: skipped ({why})", flush=True)
                continue
            for k in args.ks:
                for seed in args.seeds:
                    path = out / scenario / f"{task}-k{k}-s{seed}.json"
                    if path.exists():
                        continue
                    record = run_one(scenario, family, folders, task, k, seed)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
                    print(
                        f"{scenario}/{task} k={k} seed={seed}: {record['verdict']} → "
                        f"{record['recommended_method']} ({record['seconds']} s)",
                        flush=True,
                    )
    listed = out / "skipped.json"  # merged with the runs of other scenarios
    before = json.loads(listed.read_text(encoding="utf-8")) if listed.exists() else {}
    out.mkdir(parents=True, exist_ok=True)
    every = {f"{scenario}/{t}" for scenario in args.scenarios for t in table1_tasks(raw, scenario)}
    merged = {k: v for k, v in {**before, **skipped}.items() if k not in every - set(skipped)}
    listed.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
