"""Sign estimators beyond the paper's majority vote, on one scenario: each one's row, α on validation.

Per task, k and seed (the same shots as Table 1), each estimator's update ``θ_B + α · τ'`` is
measured with α chosen on validation, next to naive addition, the oracle mask and GradFix:

- ``mean gradient``: ``sign(−ḡ)`` of the summed gradient instead of the majority of signs;
- ``margin-weighted votes``: each shot's sign counts ``1 − p_i(y_i)`` (its probability of being
  wrong under B): the examples B already gets right say little about where to go;
- ``self-labelled votes``: the shots plus ``--unlabelled`` texts of the training pool per class
  (labels dropped), labelled by the GradFix model of the shots (``θ_B + m ⊙ τ_A``, α = 1), vote;
- ``confidence mask``: ``τ_A`` weighted by the share of agreeing votes (registered mask);
- ``tensorwise certificate``: per tensor, ``τ_A`` whole where ``⟨−ḡ, τ_A⟩ > 0`` (a first-order
  descent certificate), else the agreement mask (registered mask);
- ``votes at the transported point``: the shots vote at ``θ_B + τ_A`` (naive addition, α = 1)
  instead of at ``θ_B``: where τ_A has already moved B, which of its coordinates still point
  downhill;
- ``fine-tune signs``: the signs of B's own few-shot fine-tune on the shots
  (:func:`gradfix.votes.finetune_signs`: 120 full-batch AdamW steps at 10⁻⁴), τ_A's magnitudes;
- ``majority vote, many labelled shots`` (k = ``--many``, default 100 per class): GradFix's vote
  with far more labelled examples than a user holds, a ceiling on what more shots can give the vote.

Each draw also measures the shots-only default (``adaptive (shots, no-harm)``, as
:mod:`autochoice` does it) on the same build and grid, so its share of the naive → oracle margin
is read from this run alone, and the same choice on fine-tune signs (``adaptive (shots, no-harm,
fine-tune signs)``: per fold the signs of a fine-tune on the other fold's shots).

The shots are drawn by the same rule as Table 1's (``k`` per class, ``random.Random(seed)``).

Run:  python experiments/estimators.py --scenario text-release-far --tasks headlines --ks 1 2 5 \
          --out docs/results/raw
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from autochoice import shot_rows, task_rows
from envs import TaskEnv, make_env, relative_drift
from records import Recorder, scenario_view, setup

from gradfix import SignVotes, TaskVector, mask_task_vector
from gradfix.votes import estimate_signs

ESTIMATORS = (
    "mean gradient",
    "margin-weighted votes",
    "self-labelled votes",
    "confidence mask",
    "tensorwise certificate",
    "votes at the transported point",
    "fine-tune signs",
)
MANY = "majority vote, many labelled shots"
"""Row name (after ``estimator: ``) of the vote with ``--many`` labelled shots per class."""
"""Row names of the estimators (the page prefixes them with ``estimator: ``)."""


def weighted_signs(env: TaskEnv, indices: Sequence[int], weights: Sequence[float]) -> dict[str, Tensor]:
    """``sign(Σ_i w_i · sign(−g_i))`` per parameter: one backward per example (few examples)."""
    env.set_weights(None)
    env.voting()
    params = env.trainable()
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for index, weight in zip(indices, weights, strict=True):
        loss = env.loss(env.model, env.collate([index])).sum()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, _), grad in zip(params.items(), grads, strict=True):
            if grad is not None:
                total[name].add_(torch.sign(-grad), alpha=float(weight))
    return {name: torch.sign(t).to(torch.int8) for name, t in total.items()}


@torch.no_grad()
def wrong_probability(env: TaskEnv, indices: Sequence[int]) -> list[float]:
    """``1 − p_i(y_i)`` of θ_B on each example (softmax of its logits)."""
    env.set_weights(None)
    batch = env.collate(indices)
    probs = torch.softmax(env.logits(batch).double(), dim=-1)
    right = probs.gather(1, batch["labels"].view(-1, 1)).squeeze(1)
    return [float(1 - p) for p in right]


def unlabelled_pool(env: TaskEnv, shots: Sequence[int], per_class: int, seed: int) -> list[int]:
    """``per_class`` training examples per class, disjoint from the shots (their labels are not used)."""
    rng = random.Random(10_000 + seed)
    taken = set(shots)
    chosen: list[int] = []
    for label in sorted(set(env.train_labels), key=str):
        members = [i for i, y in enumerate(env.train_labels) if y == label and i not in taken]
        chosen.extend(rng.sample(members, min(per_class, len(members))))
    return sorted(chosen)


@torch.no_grad()
def self_labelled_votes(
    env: TaskEnv, shots: Sequence[int], gradfix: TaskVector, pool: Sequence[int]
) -> SignVotes:
    """Votes on the shots and on ``pool`` labelled by ``θ_B + gradfix`` (its own argmax); text tasks."""
    if not hasattr(env, "train"):
        raise TypeError(f"{env.task}: self-labelled votes need a text task (examples with labels to swap)")
    with env.weights(gradfix, 1.0):
        predicted = env.logits(env.collate(pool)).argmax(dim=-1)
    original = {i: env.train_labels[i] for i in pool}
    try:
        for index, label in zip(pool, predicted.tolist(), strict=True):
            env.train[index] = replace(env.train[index], label=env.labels[label])
        with torch.enable_grad():
            return env.votes([*shots, *pool])
    finally:
        for index, label in original.items():
            env.train[index] = replace(env.train[index], label=label)


def estimator_updates(
    env: TaskEnv, shots: Sequence[int], votes: SignVotes, seed: int, per_class: int
) -> dict[str, TaskVector]:
    """Every estimator's ``τ'`` for one draw of shots, by row name (:data:`ESTIMATORS`)."""
    gradfix = mask_task_vector(env.tau_a, votes, "agreement")
    mean_votes = env.votes(shots, "mean")
    weights = wrong_probability(env, shots)
    pool = unlabelled_pool(env, shots, per_class, seed)
    return {
        ESTIMATORS[0]: mask_task_vector(env.tau_a, mean_votes, "agreement"),
        ESTIMATORS[1]: mask_task_vector(env.tau_a, weighted_signs(env, shots, weights), "agreement"),
        ESTIMATORS[2]: mask_task_vector(
            env.tau_a, self_labelled_votes(env, shots, gradfix, pool), "agreement"
        ),
        ESTIMATORS[3]: mask_task_vector(env.tau_a, votes, "confidence"),
        ESTIMATORS[4]: mask_task_vector(env.tau_a, mean_votes, "tensorwise"),
        ESTIMATORS[5]: mask_task_vector(env.tau_a, votes_at(env, shots, env.tau_a), "agreement"),
        ESTIMATORS[6]: mask_task_vector(env.tau_a, env.finetune_votes(shots, seed), "agreement"),
    }


def votes_at(env: TaskEnv, shots: Sequence[int], update: TaskVector, alpha: float = 1.0) -> SignVotes:
    """The shots' majority vote at ``θ_B + α · update`` (the model is back at ``θ_B`` afterwards)."""
    with env.weights(update, alpha):
        env.voting()
        return estimate_signs(env.model, [env.collate(shots)], env.loss, "majority", progress=False)


def run_task(env: TaskEnv, rec: Recorder, args: argparse.Namespace) -> None:
    """Baselines, then GradFix and every estimator at each k and seed."""
    row: Callable[..., None] = lambda **kw: rec.add(scenario=env.scenario, task=env.task, **kw)  # noqa: E731
    task_rows(env, row, references="all")  # zero-shot B, fine-tuned B, naive, the oracle mask
    for k in args.ks:
        for seed in args.seeds:
            start = time.perf_counter()
            shot_rows(env, row, k, seed, ["no-harm"], "lean")  # the default and GradFix
            shot_rows(env, row, k, seed, ["no-harm"], "none", "finetune")  # the default on fine-tune signs
            shots = env.shots(k, seed)
            votes = env.votes(shots)
            for name, update in estimator_updates(env, shots, votes, seed, args.unlabelled).items():
                row(method=f"estimator: {name}", k=k, seed=seed, **env.sweep(update))
            rec.log(f"{env.task}: k={k} seed={seed} in {time.perf_counter() - start:.0f} s")
    for seed in args.seeds if args.many else ():
        many = mask_task_vector(env.tau_a, env.votes(env.shots(args.many, seed)), "agreement")
        row(method=f"estimator: {MANY}", k=args.many, seed=seed, **env.sweep(many))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--tasks", nargs="*", help="default: every task of the scenario")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 5])
    parser.add_argument(
        "--unlabelled", type=int, default=10, help="unlabelled texts per class (self-labelled)"
    )
    parser.add_argument(
        "--many", type=int, default=100, help="labelled shots per class of the many-shot vote (0: skip)"
    )
    parser.add_argument("--name", help="name of the results file (default estimators-<scenario>)")
    args, rec, scenario = setup(parser)
    args.view = scenario_view(scenario, args.cache, args.tasks)
    tasks = args.tasks or list(scenario.tasks)
    envs = [make_env(args.view, t, scenario.family, "B", scenario.name) for t in tasks]
    rec.meta.update(
        scenario=scenario.name,
        family=scenario.family,
        tasks=tasks,
        seeds=args.seeds,
        ks=args.ks,
        unlabelled_per_class=args.unlabelled,
        extra_ks=[args.many] if args.many else [],
        drift=relative_drift(args.view, "encoder.*" if scenario.family == "text" else None),
    )
    for env in envs:
        run_task(env, rec, args)
        rec.save()


if __name__ == "__main__":
    main()
