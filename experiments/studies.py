"""The paper's other studies on one scenario: masks and estimators across α, subset selection,
per-layer sign agreement, multi-task merging and multi-source transport.

Run:  python experiments/studies.py masks --scenario text-release-short --out docs/results/raw
Studies: ``masks``, ``subsets``, ``agreement``, ``multitask``, ``multisource`` (text only: τ from
A and from the short release, both moved onto the long release).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from envs import ALPHAS, TaskEnv, make_env
from records import Recorder, scenario_view, setup

from gradfix import TaskVector, mask_task_vector
from gradfix.merge import mask_then_merge, merge_task_vectors, merge_then_mask
from gradfix.selection import SELECTIONS, select_per_class

STRATEGIES = ("agreement", "forcing", "magnitude", "random", "gate", "confidence", "tensorwise")


def curve(env: TaskEnv, update: Mapping[str, Tensor]) -> dict[str, Any]:
    """Validation and test accuracy at every α of the grid (a curve, not a choice)."""
    return {
        "alphas": list(ALPHAS),
        "validation_curve": [env.accuracy(update, a, "validation") for a in ALPHAS],
        "test_curve": [env.accuracy(update, a, "test") for a in ALPHAS],
    }


def study_masks(env: TaskEnv, rec: Recorder, args: argparse.Namespace) -> None:
    """Each mask strategy with estimated (majority, k) and oracle (τ_B) signs; majority vs mean."""
    from gradfix.ops.masks import MASKS

    strategies = [s for s in STRATEGIES if s in MASKS]
    base = {"scenario": env.scenario, "task": env.task, "study": "masks", "k": args.k}
    for s in strategies:
        update = mask_task_vector(env.tau_a, env.tau_b, s)
        rec.add(**base, method=s, signs="oracle", **curve(env, update))
    for seed in args.seeds:
        votes = env.votes(env.shots(args.k, seed))
        for s in strategies:
            update = mask_task_vector(env.tau_a, votes, s, seed=seed)
            rec.add(**base, method=s, signs="majority", seed=seed, **curve(env, update))
        update = mask_task_vector(env.tau_a, votes.with_estimator("mean"), "agreement")
        rec.add(**base, method="agreement", signs="mean", seed=seed, **curve(env, update))
        rec.save()


def study_subsets(env: TaskEnv, rec: Recorder, args: argparse.Namespace) -> None:
    """GradFix at k shots per class chosen by each selection method on B's features."""
    pool = list(range(len(env.train_labels)))
    start = time.perf_counter()
    features = env.features(pool)
    rec.log(f"{env.task}: features of {len(pool)} examples in {time.perf_counter() - start:.0f} s")
    for method in SELECTIONS:
        for seed in args.seeds:
            shots = select_per_class(features, env.train_labels, args.k, method, seed)
            votes = env.votes(shots)
            result = env.sweep(mask_task_vector(env.tau_a, votes, "agreement"))
            rec.add(
                scenario=env.scenario,
                task=env.task,
                study="subsets",
                method=method,
                k=args.k,
                seed=seed,
                **result,
            )
        rec.save()


def layer_key(name: str) -> tuple[str, str]:
    """``(layer, module kind)`` of a parameter name, for the heatmap."""
    match = re.search(r"layer\.(\d+)\.(.*)\.(weight|bias)$", name)
    if match:
        kind = match.group(2).replace("attention.self.", "").replace("attention.output.", "attn.")
        return f"layer {match.group(1)}", f"{kind}.{match.group(3)}"
    module, _, leaf = name.rpartition(".")
    return module, leaf


def study_agreement(env: TaskEnv, rec: Recorder, args: argparse.Namespace) -> None:
    """Per layer and module: sign agreement of τ_A with τ_B, of ŝ with τ_B, and of ŝ with τ_A."""
    votes = env.votes(env.shots(args.k, args.seeds[0]))
    estimate = votes.sign()
    pairs = {
        "tau_A vs tau_B": (env.tau_a, env.tau_b),
        "votes vs tau_B": (estimate, env.tau_b),
        "votes vs tau_A": (estimate, env.tau_a),
    }
    for label, (first, second) in pairs.items():
        cells: dict[tuple[str, str], list[int]] = {}
        for name in env.tau_a:
            a, b = torch.sign(first[name].float()), torch.sign(second[name].float())
            both = (a != 0) & (b != 0)
            cell = cells.setdefault(layer_key(name), [0, 0])
            cell[0] += int(((a == b) & both).sum())
            cell[1] += int(both.sum())
        for (layer, kind), (agree, total) in cells.items():
            rec.add(
                scenario=env.scenario,
                task=env.task,
                study="agreement",
                pair=label,
                layer=layer,
                module=kind,
                agreement=agree / total if total else float("nan"),
                coordinates=total,
            )
    rec.save()


def merged_sweep(envs: Sequence[TaskEnv], update: Mapping[str, Tensor]) -> dict[str, Any]:
    """α chosen on the mean validation accuracy over the tasks; test accuracy per task there."""
    val = {a: sum(e.accuracy(update, a, "validation") for e in envs) / len(envs) for a in ALPHAS}
    alpha = max(ALPHAS, key=lambda a: (val[a], -a))
    tests = {e.task: e.accuracy(update, alpha, "test") for e in envs}
    return {
        "alpha": alpha,
        "validation": val[alpha],
        "test": sum(tests.values()) / len(tests),
        "test_by_task": tests,
    }


def study_multitask(envs: Sequence[TaskEnv], rec: Recorder, args: argparse.Namespace) -> None:
    """Task Arithmetic and TIES on B: baseline, mask-then-merge, merge-then-mask (k shots per task)."""
    taus = [e.tau_a for e in envs]
    base = {"scenario": envs[0].scenario, "study": "multitask", "k": args.k}
    for e in envs:
        rec.add(
            **base,
            task=e.task,
            method="fine-tuned B (per task)",
            test=e.accuracy(e.tau_b, 1.0, "test"),
            zero_shot=e.accuracy(None, 0, "test"),
        )
    for method in ("task_arithmetic", "ties"):
        rec.add(
            **base, merge=method, method="baseline", **merged_sweep(envs, merge_task_vectors(taus, method))
        )
        for seed in args.seeds:
            votes = [e.votes(e.shots(args.k, seed)) for e in envs]
            for pipeline, fn in (("mask-then-merge", mask_then_merge), ("merge-then-mask", merge_then_mask)):
                update = fn(taus, votes, method=method)
                rec.add(**base, merge=method, method=pipeline, seed=seed, **merged_sweep(envs, update))
            rec.save()


def study_multisource(env: TaskEnv, rec: Recorder, args: argparse.Namespace) -> None:
    """One task from two sources (A and the short release) moved onto the long release."""
    short = scenario_view_named("text-release-short", args.cache)
    tau_s = TaskVector.from_checkpoints(short / "B", short / f"B-ft/{env.task}", include="encoder.*")
    base = {"scenario": env.scenario, "task": env.task, "study": "multisource", "k": args.k}
    rec.add(**base, method="naive τ_A", **env.sweep(env.tau_a))
    rec.add(**base, method="naive τ_short", **env.sweep(tau_s))
    for method in ("task_arithmetic", "ties"):
        rec.add(
            **base,
            merge=method,
            method="naive merge",
            **env.sweep(merge_task_vectors([env.tau_a, tau_s], method)),
        )
    for seed in args.seeds:
        votes = env.votes(env.shots(args.k, seed))
        for name, tau in (("GradFix τ_A", env.tau_a), ("GradFix τ_short", tau_s)):
            rec.add(**base, method=name, seed=seed, **env.sweep(mask_task_vector(tau, votes, "agreement")))
        for method in ("task_arithmetic", "ties"):
            update = mask_then_merge([env.tau_a, tau_s], [votes, votes], method=method)
            rec.add(**base, merge=method, method="GradFix mask-then-merge", seed=seed, **env.sweep(update))
        rec.save()


def scenario_view_named(name: str, cache: str | None) -> Path:
    """The folder of another scenario (built or reused)."""
    from gradfix.zoo import get_scenario

    return scenario_view(get_scenario(name), cache)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("study", choices=["masks", "subsets", "agreement", "multitask", "multisource"])
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--tasks", nargs="*", help="default: the first task (every task for multitask)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--k", type=int, default=5, help="shots per class")
    parser.add_argument("--name", help="results file name (default <study>-<scenario>)")
    args, rec, scenario = setup(parser)
    rec.path = rec.path.with_name(f"{args.name or args.study + '-' + scenario.name}.json")
    view = scenario_view(scenario, args.cache)
    every = args.study in ("multitask", "agreement")
    tasks = args.tasks or (list(scenario.tasks) if every else [scenario.tasks[0]])
    envs = [make_env(view, t, scenario.family) for t in tasks]
    rec.meta.update(
        experiment=args.study,
        study=args.study,
        scenario=scenario.name,
        tasks=tasks,
        seeds=args.seeds,
        k=args.k,
    )
    if args.study == "multitask":
        study_multitask(envs, rec, args)
    else:
        fn = {
            "masks": study_masks,
            "subsets": study_subsets,
            "agreement": study_agreement,
            "multisource": study_multisource,
        }[args.study]
        for env in envs:
            fn(env, rec, args)
    rec.save()


if __name__ == "__main__":
    main()
