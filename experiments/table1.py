"""Table 1 of the paper on one scenario: every transport method, α on validation, several seeds.

Rows per task: zero-shot B, fine-tuned B (upper bound), naive ``θ_B + α τ_A``, the oracle mask
(``sign(τ_B)``), the random task vector ablation, TransFusion and GradFix on TransFusion, GradFix at
each k, the vote-margin gate (t = 0.2, 0.4), adaptive (t and α chosen on validation, and from the
shots alone by 2-fold cross-validation of the loss), the controls of :mod:`controls` (the same
votes on a random task vector, a sign step of B, τ_A's magnitudes shuffled under GradFix's signs;
each with α on validation), and few-shot fine-tuning of B on the same examples (1 step, and a
tuned number of steps). Text tasks also get the support check (retrieval
accuracy of the transported model, a skill no task trains).

Run:  python experiments/table1.py --scenario text-release-short --out docs/results/raw
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from controls import control_vectors
from envs import GATE_GRID, TaskEnv, best_on_validation, make_env, relative_drift
from records import Recorder, scenario_view, setup

from gradfix import TaskVector, mask_task_vector, random_task_vector
from gradfix.methods.autotune import NAIVE, candidate_key, gated

GATES = tuple(t for t in GATE_GRID if 0 < t <= 1)
FEWSHOT_LR = {"text": 1e-4, "vision": 2e-3}


def transfusion_vectors(view: Path, envs: Sequence[TaskEnv], family: str) -> dict[str, TaskVector] | str:
    """TransFusion's ``P(τ_A)`` per task (one weight matching of A onto B), or why it cannot run."""
    from gradfix.errors import GradfixError
    from gradfix.io import load_state_dict
    from gradfix.methods.transfusion import (
        apply_permutations,
        match_permutations,
        spec_for_module,
        spec_for_state_dict,
    )

    source = {n: t for n, t in load_state_dict(view / "A").items() if t.is_floating_point()}
    target = {n: t for n, t in load_state_dict(view / "B").items() if t.is_floating_point()}
    try:
        if family == "text":
            spec = spec_for_state_dict(source, num_heads=12)
        else:  # convolutions: the spec comes from the module (hidden channels between layers)
            from gradfix.zoo.vision import load_backbone

            spec = spec_for_module(load_backbone(view / "A"))
        perms = match_permutations(source, target, spec, seed=0)
    except (GradfixError, ValueError, KeyError) as exc:
        return f"{type(exc).__name__}: {exc}"
    moved = sum(int((p != torch.arange(len(p))).sum()) for p in perms.values())
    total = sum(len(p) for p in perms.values())
    print(f"  TransFusion: {moved} of {total} units moved by the matching")
    return {env.task: TaskVector(apply_permutations(dict(env.tau_a), perms, spec)) for env in envs}


class Candidates:
    """Validation (and on demand test) accuracy of gate candidates ``(t, α)`` for one vote, cached."""

    def __init__(self, env: TaskEnv, naive_val: Mapping[str, float]):
        self.env = env
        self.val: dict[tuple[float, float], float] = {(NAIVE, float(a)): v for a, v in naive_val.items()}
        self.test: dict[tuple[float, float], float] = {}
        self.updates: dict[float, Mapping[str, Tensor]] = {NAIVE: env.tau_a}

    def add(self, t: float, update: Mapping[str, Tensor]) -> None:
        self.updates[t] = update

    def validation(self, t: float, alpha: float) -> float:
        if (t, alpha) not in self.val:
            self.val[(t, alpha)] = self.env.accuracy(self.updates[t], alpha, "validation")
        return self.val[(t, alpha)]

    def best(self, thresholds: Sequence[float]) -> tuple[float, float]:
        return best_on_validation(self.validation, thresholds)

    def test_of(self, key: tuple[float, float]) -> float:
        if key not in self.test:
            self.test[key] = self.env.accuracy(self.updates[key[0]], key[1], "test")
        return self.test[key]


def run_task(env: TaskEnv, rec: Recorder, args: argparse.Namespace, family: str, tf: Any) -> None:
    """All Table 1 rows of one task."""
    base = {"scenario": env.scenario, "task": env.task}
    row: Callable[..., None] = lambda **kw: rec.add(**base, **kw)  # noqa: E731
    start = time.perf_counter()
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
    naive = env.sweep(env.tau_a)
    row(method="naive", **naive)
    row(method="oracle mask", **env.sweep(mask_task_vector(env.tau_a, env.tau_b, "agreement")))
    rec.log(f"{env.task}: baselines in {time.perf_counter() - start:.0f} s")
    for seed in args.seeds:
        row(method="random task vector", seed=seed, **env.sweep(random_task_vector(env.tau_a, seed)))
    if isinstance(tf, dict):
        row(method="TransFusion", **env.sweep(tf[env.task]))
    elif tf is not None:
        row(method="TransFusion", note=str(tf))
    for k in args.ks:
        for seed in args.seeds:
            shots = env.shots(k, seed)
            votes = env.votes(shots)
            gradfix = mask_task_vector(env.tau_a, votes, "agreement")
            result = env.sweep(gradfix)
            row(method="GradFix", k=k, seed=seed, **result)
            if isinstance(tf, dict) and k == args.fewshot_k:
                on_tf = mask_task_vector(tf[env.task], votes, "agreement")
                row(method="GradFix on TransFusion", k=k, seed=seed, **env.sweep(on_tf))
            if k in args.gate_ks:
                gate_rows(env, row, k, seed, shots, votes, gradfix, naive, result)
            if k in args.control_ks:
                for name, update in control_vectors(env.tau_a, votes, seed).items():
                    row(method=f"control: {name}", k=k, seed=seed, **env.sweep(update))
        rec.log(f"{env.task}: k={k} done ({time.perf_counter() - start:.0f} s)")
    for seed in [] if args.no_fewshot else args.seeds:
        fewshot_rows(env, row, args.fewshot_k, seed, FEWSHOT_LR[family])
    if family == "text" and args.skill:
        skill_rows(env, rec, args)
    rec.log(f"{env.task}: done in {time.perf_counter() - start:.0f} s")


def gate_rows(
    env: TaskEnv,
    row: Callable[..., None],
    k: int,
    seed: int,
    shots: list[int],
    votes: Any,
    gradfix: TaskVector,
    naive: dict[str, Any],
    gradfix_result: dict[str, Any],
) -> None:
    """Gate at fixed thresholds, and adaptive (t, α) chosen on validation and on the shots."""
    cands = Candidates(env, naive["validation_by_alpha"])
    cands.val.update({(0.0, float(a)): v for a, v in gradfix_result["validation_by_alpha"].items()})
    cands.updates[0.0] = gradfix
    cands.test[(0.0, gradfix_result["alpha"])] = gradfix_result["test"]
    cands.test[(NAIVE, naive["alpha"])] = naive["test"]
    for t in GATES:
        start = time.perf_counter()
        cands.add(t, gated(env.tau_a, votes, t))
        key = cands.best([t])
        row(
            method=f"gate t={t:g}",
            k=k,
            seed=seed,
            threshold=t,
            alpha=key[1],
            validation=cands.val[key],
            test=cands.test_of(key),
            seconds=round(time.perf_counter() - start, 2),
        )
    grid = GATE_GRID
    key = cands.best(grid)
    row(
        method="adaptive (validation)",
        k=k,
        seed=seed,
        threshold=key[0],
        alpha=key[1],
        validation=cands.val[key],
        test=cands.test_of(key),
    )
    start = time.perf_counter()
    choice = env.choose_on_shots(shots, seed, rule="min")
    chosen = (choice.threshold, choice.alpha)
    if chosen[0] not in cands.updates:
        cands.add(chosen[0], gated(env.tau_a, votes, chosen[0]))
    best_val = cands.validation(*cands.best(grid))
    row(
        method="adaptive (shots, min loss)",
        k=k,
        seed=seed,
        threshold=chosen[0],
        alpha=chosen[1],
        validation=cands.validation(*chosen),
        test=cands.test_of(chosen),
        validation_regret=best_val - cands.validation(*chosen),
        choice={candidate_key(*chosen): choice.score},
        seconds=round(time.perf_counter() - start, 2),
    )


def fewshot_rows(env: TaskEnv, row: Callable[..., None], k: int, seed: int, lr: float) -> None:
    """Few-shot fine-tuning of B on the GradFix shots: 1 step (lr on validation) and tuned steps.

    One step: lr ∈ {lr/10, lr, 10·lr}; tuned: one run at ``lr`` evaluated after 5, 10, 20 and 30
    steps; each picks its setting on validation (fewer steps on ties) and reports test there.
    """
    shots = env.shots(k, seed)
    for method, runs in (
        ("few-shot FT, 1 step", [(rate, (1,)) for rate in (lr / 10, lr, lr * 10)]),
        ("few-shot FT, tuned", [(lr, (5, 10, 20, 30))]),
    ):
        start = time.perf_counter()
        results = []
        for rate, steps in runs:
            for step, tau in env.finetune(shots, steps, rate, seed):
                results.append((env.accuracy(tau, 1.0, "validation"), -step, step, rate, tau))
        val, _, steps, rate, tau = max(results, key=lambda r: r[:2])
        row(
            method=method,
            k=k,
            seed=seed,
            alpha=1.0,
            steps=steps,
            lr=f"{rate:g}",
            validation=val,
            test=env.accuracy(tau, 1.0, "test"),
            seconds=round(time.perf_counter() - start, 2),
        )


def skill_rows(env: TaskEnv, rec: Recorder, args: argparse.Namespace) -> None:
    """Retrieval accuracy (support task) of B before and after each transport, at the α chosen above."""
    from gradfix.zoo.text import read_jsonl, retrieval_accuracy

    pairs = read_jsonl(args.view / "data" / "support" / "retrieval.jsonl")
    seed, k = args.seeds[0], args.fewshot_k
    votes = env.votes(env.shots(k, seed))

    def alpha_of(method: str, **match: Any) -> float:
        rows = [r for r in rec.rows if r["task"] == env.task and r["method"] == method and "study" not in r]
        rows = [r for r in rows if all(r.get(key) == value for key, value in match.items())]
        return float(rows[0]["alpha"]) if rows else 1.0

    adaptive = [
        r
        for r in rec.rows
        if r["task"] == env.task
        and r["method"] == "adaptive (validation)"
        and r.get("k") == k
        and r.get("seed") == seed
    ]
    cases = [
        ("zero-shot B", None, 0.0),
        ("fine-tuned B", env.tau_b, 1.0),
        ("naive", env.tau_a, alpha_of("naive")),
        ("GradFix", mask_task_vector(env.tau_a, votes, "agreement"), alpha_of("GradFix", k=k, seed=seed)),
        ("oracle mask", mask_task_vector(env.tau_a, env.tau_b, "agreement"), alpha_of("oracle mask")),
    ]
    if adaptive:
        cases.append(
            ("adaptive (validation)", gated(env.tau_a, votes, adaptive[0]["threshold"]), adaptive[0]["alpha"])
        )
    for method, update, alpha in cases:
        with env.weights(update, alpha):
            score = retrieval_accuracy(env.model, env.recipe.tokenizer, pairs)
        rec.add(
            scenario=env.scenario,
            task=env.task,
            method=method,
            study="support retrieval",
            k=k,
            seed=seed,
            alpha=alpha,
            retrieval=score,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--tasks", nargs="*", help="default: every task of the scenario")
    parser.add_argument("--target", default="B", help="B, or A for the no-drift level (B = A)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 5, 10])
    parser.add_argument("--gate-ks", type=int, nargs="*", default=[1, 2, 5])
    parser.add_argument("--control-ks", type=int, nargs="*", default=[1, 2, 5])
    parser.add_argument("--fewshot-k", type=int, default=5)
    parser.add_argument("--no-transfusion", action="store_true")
    parser.add_argument("--no-skill", dest="skill", action="store_false")
    parser.add_argument("--no-fewshot", action="store_true")
    parser.add_argument("--name", help="name of the results file (default table1-<scenario>)")
    args, rec, scenario = setup(parser)
    args.view = scenario_view(scenario, args.cache, args.tasks)
    family = scenario.family
    tasks = args.tasks or list(scenario.tasks)
    label = scenario.name if args.target == "B" else f"{scenario.name} (B = {args.target})"
    envs = [make_env(args.view, t, family, args.target, label) for t in tasks]
    include = "encoder.*" if family == "text" else None
    rec.meta.update(
        scenario=label,
        family=family,
        tasks=tasks,
        seeds=args.seeds,
        ks=args.ks,
        drift=0.0 if args.target == "A" else relative_drift(args.view, include),
        sizes={e.task: e.sizes for e in envs},
    )
    tf = None if args.no_transfusion or args.target != "B" else transfusion_vectors(args.view, envs, family)
    for env in envs:
        run_task(env, rec, args, family, tf)
        rec.save()


if __name__ == "__main__":
    main()
