"""The default of `gradfix transport` measured: t and α chosen from the shots alone.

For each task, k and seed (the same shots as Table 1) it does what the CLI does without a
validation file: ``score_on_shots`` (2 folds; one vote per fold, every candidate (t, α) of the
grid scored on the held-out shots) and then each rule of ``--rules`` picks the gate threshold t
and α (``no-harm``, the CLI default: B unchanged unless a candidate lowers B's held-out loss on
every fold and by more than z standard errors, ``no-harm:2`` for z = 2; ``one-se``; ``min``), the
votes on every shot make the mask, and the transported model is measured on validation and test.
Rows are named ``adaptive (shots, <rule>)``.

Without ``--references`` the rows join their scenario's Table 1 (file ``autochoice-<scenario>``).
With ``--references all`` the file (``floors-<scenario>``) is self-contained, every row on the
grid of this run: zero-shot B, fine-tuned B, naive, the oracle mask and GradFix (α on validation),
adaptive with t and α on validation, the controls of :mod:`controls` (α on validation), and the
shots-only rules: the floors of the default are read from it. ``--references lean`` measures only
zero-shot B, fine-tuned B, naive and GradFix besides the rules (a floors run on a busy machine).

Run:  python experiments/autochoice.py --scenario text-release-short --out docs/results/raw
      python experiments/autochoice.py --scenario vision-independent --references all --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from controls import control_vectors
from envs import ALPHAS, GATE_GRID, TaskEnv, best_on_validation, make_env, relative_drift
from records import scenario_view, setup

from gradfix import mask_task_vector
from gradfix.methods.autotune import NAIVE, gated
from gradfix.votes.finetune import finetune_fold_signs

RULE_NAMES = {
    "no-harm": "adaptive (shots, no-harm)",
    "one-se": "adaptive (shots, 1-SE)",
    "min": "adaptive (shots, min loss)",
}


def rule_name(rule: str) -> str:
    """The row name of a rule spec (``no-harm:2`` is the no-harm rule with z = 2)."""
    base, _, margin = rule.partition(":")
    return RULE_NAMES[base] if not margin else f"{RULE_NAMES[base][:-1]} z={margin})"


class Accuracies:
    """Validation and test accuracy of ``θ_B + α · (m_t ⊙ τ_A)`` per candidate, each measured once."""

    def __init__(self, env: TaskEnv, updates: Mapping[float, Mapping[str, Tensor]]):
        self.env, self.updates = env, dict(updates)
        self.cache: dict[tuple[float, float, str], float] = {}

    def __call__(self, t: float, alpha: float, split: str) -> float:
        key = (t, alpha, split)
        if key not in self.cache:
            self.cache[key] = self.env.accuracy(self.updates[t], alpha, split)
        return self.cache[key]

    def best_on_validation(self) -> tuple[float, float]:
        """The candidate with the best validation accuracy (the earlier in grid order on a tie)."""
        return best_on_validation(lambda t, a: self(t, a, "validation"), GATE_GRID)


def shot_rows(
    env: TaskEnv,
    row: Callable[..., None],
    k: int,
    seed: int,
    rules: list[str],
    references: str,
    signs: str = "votes",
    runs: int = 1,
) -> None:
    """The rows of one draw of shots: each rule's choice; with ``references`` ``lean`` GradFix (α on
    validation) too, with ``all`` also adaptive on validation and the controls. ``signs="finetune"``:
    the signs come from B's own few-shot fine-tune (``runs`` of them summed), per fold and on every
    shot (rows named so, the fine-tune-sign mask on validation too); GradFix stays on B's votes and
    the controls are left out."""
    start = time.perf_counter()
    shots = env.shots(k, seed)
    finetune = signs == "finetune"
    votes = env.finetune_votes(shots, seed, runs) if finetune else env.votes(shots)
    acc = Accuracies(env, {t: gated(env.tau_a, votes, t) for t in GATE_GRID})
    options = {"fold_signs": finetune_fold_signs(env.loss, seed=seed, runs=runs)} if finetune else {}
    scores = env.score_on_shots(shots, seed, correct=env.correct, **options)
    for rule in rules:
        base, _, margin = rule.partition(":")
        choice = scores.choose(base, float(margin)) if margin else scores.choose(base)
        t, alpha = choice.threshold, choice.alpha
        row(
            method=rule_name(rule) if not finetune else f"{rule_name(rule)[:-1]}, fine-tune signs)",
            k=k,
            seed=seed,
            threshold=t,
            alpha=alpha,
            validation=acc(t, alpha, "validation"),
            test=acc(t, alpha, "test"),
            seconds=round(time.perf_counter() - start, 2),
        )
    if references == "none":
        return
    suffix = " (fine-tune signs)" if finetune else ""
    if finetune:  # the mask on the fine-tune's signs; the floors compare with GradFix on B's votes
        row(method="fine-tune signs", k=k, seed=seed, **env.sweep(acc.updates[0.0]))
    gradfix = gated(env.tau_a, env.votes(shots), 0.0) if finetune else acc.updates[0.0]
    row(method="GradFix", k=k, seed=seed, **env.sweep(gradfix))
    if references == "lean":
        return
    t, alpha = acc.best_on_validation()
    row(
        method=f"adaptive (validation){suffix}",
        k=k,
        seed=seed,
        threshold=t,
        alpha=alpha,
        validation=acc(t, alpha, "validation"),
        test=acc(t, alpha, "test"),
    )
    if finetune:  # the controls are the vote's
        return
    for name, update in control_vectors(env.tau_a, votes, seed).items():
        row(method=f"control: {name}", k=k, seed=seed, **env.sweep(update))


def task_rows(env: TaskEnv, row: Callable[..., None], references: str) -> None:
    """The rows that need no shots: zero-shot B, fine-tuned B, naive (α on validation), and unless
    ``references`` is ``lean`` the oracle mask."""
    row(
        method="zero-shot B",
        validation=env.accuracy(None, 0, "validation"),
        test=env.accuracy(None, 0, "test"),
    )
    row(
        method="fine-tuned B",
        validation=env.accuracy(env.tau_b, 1, "validation"),
        test=env.accuracy(env.tau_b, 1, "test"),
        alpha=1.0,
    )
    row(method="naive", **env.sweep(env.tau_a))
    if references == "lean":
        return
    row(method="oracle mask", **env.sweep(mask_task_vector(env.tau_a, env.tau_b, "agreement")))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--tasks", nargs="*")
    parser.add_argument("--target", default="B")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 5])
    parser.add_argument("--rules", nargs="+", default=["no-harm", "no-harm:2", "one-se", "min"])
    parser.add_argument(
        "--references",
        choices=("none", "lean", "all"),
        default="none",
        help="also the rows the floors compare with: lean (zero-shot, fine-tuned B, naive, GradFix) "
        "or all (also the oracle mask, adaptive on validation and the controls)",
    )
    parser.add_argument(
        "--signs",
        choices=["votes", "finetune"],
        default="votes",
        help="the signs of the mask: B's per-sample votes, or B's own few-shot fine-tune (rows named so)",
    )
    parser.add_argument(
        "--finetune-runs",
        type=int,
        default=1,
        help="with --signs finetune: fine-tunes summed per estimate (dropout seeds seed, seed + 1000, …)",
    )
    parser.add_argument("--name")
    args, rec, scenario = setup(parser)
    if args.references != "none" and not args.name:
        rec.path = rec.path.with_name(rec.path.name.replace("autochoice-", "floors-", 1))
        rec.meta["experiment"] = rec.path.stem
    view = scenario_view(scenario, args.cache, args.tasks)  # only the tasks asked for are built
    tasks = args.tasks or list(scenario.tasks)
    label = scenario.name if args.target == "B" else f"{scenario.name} (B = {args.target})"
    include = "encoder.*" if scenario.family == "text" else None
    rec.meta.update(
        experiment=rec.path.stem,
        scenario=label,
        tasks=tasks,
        seeds=args.seeds,
        ks=args.ks,
        rules=args.rules,
        finetune_runs=args.finetune_runs,
        alphas=list(ALPHAS),
        thresholds=["naive" if t == NAIVE else t for t in GATE_GRID],
        drift=0.0 if args.target == "A" else relative_drift(view, include),
    )
    rec.meta["sizes"] = {}
    for task in tasks:
        env = make_env(view, task, scenario.family, args.target, label)
        rec.meta["sizes"][task] = env.sizes
        row = partial(rec.add, scenario=label, task=task)

        if args.references != "none":
            task_rows(env, row, args.references)
        for k in args.ks:
            for seed in args.seeds:
                shot_rows(env, row, k, seed, args.rules, args.references, args.signs, args.finetune_runs)
                rec.save()
            rec.log(f"{task} k={k} done")
    rec.save()


if __name__ == "__main__":
    main()
