"""The default of `gradfix transport` measured: t and α chosen from the shots alone, 1-SE rule.

For each task, k and seed (the same shots as Table 1) it runs what the CLI does without a
validation file: ``choose_on_shots`` (2 folds, the one-standard-error rule, never a candidate
less accurate than B on the held-out shots) picks the gate threshold t and α, the votes on every
shot make the mask, and the transported model is measured on validation and test. Rows are
named ``adaptive (shots, 1-SE)``; Table 1's ``adaptive (shots, min loss)`` rows are the same
choice by the plain minimum of the held-out loss, without the accuracy guard.

Run:  python experiments/autochoice.py --scenario text-release-short --out docs/results/raw
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from envs import make_env, relative_drift
from records import scenario_view, setup

from gradfix.methods.autotune import gated


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--tasks", nargs="*")
    parser.add_argument("--target", default="B")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 5])
    parser.add_argument("--name")
    args, rec, scenario = setup(parser)
    view = scenario_view(scenario, args.cache, args.tasks)
    tasks = args.tasks or list(scenario.tasks)
    label = scenario.name if args.target == "B" else f"{scenario.name} (B = {args.target})"
    include = "encoder.*" if scenario.family == "text" else None
    rec.meta.update(
        experiment="autochoice",
        scenario=label,
        tasks=tasks,
        seeds=args.seeds,
        ks=args.ks,
        drift=0.0 if args.target == "A" else relative_drift(view, include),
    )
    for task in tasks:
        env = make_env(view, task, scenario.family, args.target, label)
        for k in args.ks:
            for seed in args.seeds:
                start = time.perf_counter()
                shots = env.shots(k, seed)
                choice = env.choose_on_shots(shots, seed, rule="one-se", correct=env.correct)
                update = gated(env.tau_a, env.votes(shots), choice.threshold)
                rec.add(
                    scenario=label,
                    task=task,
                    method="adaptive (shots, 1-SE)",
                    k=k,
                    seed=seed,
                    threshold=choice.threshold,
                    alpha=choice.alpha,
                    validation=env.accuracy(update, choice.alpha, "validation"),
                    test=env.accuracy(update, choice.alpha, "test"),
                    seconds=round(time.perf_counter() - start, 2),
                )
            rec.save()
        rec.log(f"{task} done")
    rec.save()


if __name__ == "__main__":
    main()
