"""Cross-width transport: a task vector of a width-32 CNN carried onto a width-16 CNN.

Scenario ``vision-widths`` (built on first use, then read from the cache; docs/scenarios.md):
A is vision-independent's small CNN (width 32), B a CNN of width 16 pre-trained independently
(another seed, the other half of the pre-training images); both embed into 128 dimensions and are
read through their own frozen class-prototype heads. ``τ_A`` = A fine-tuned on the task − A has
other shapes than B's parameters, so it cannot be added to B as it is.

What it measures, per task, is B's test accuracy (B's own prototype head) after ``θ_B + α τ``:

- ``zero-shot B`` (τ = 0) and ``fine-tuned B`` (B's own fine-tune: the upper bound);
- ``naive (truncated τ_A)``: τ_A cut to B's shapes, the first d_B entries of every axis (the
  first 16 of conv1's 32 output channels, ...). Adding coordinates index by index is the only
  naive way to add a task vector across widths; the channels it pairs up are unrelated;
- ``Theseus (activations)``: τ_A mapped by one orthogonal Procrustes map per hidden space, from
  the cross-covariance of A's and B's channels on the task's first 512 training images;
- ``Theseus (data-free)``: the same maps from the two bases' weights alone;
- ``GradFix on Theseus``: the Theseus τ masked where B's per-sample gradient-sign votes on k = 5
  training images per class (drawn with each seed) disagree with it (agreement mask);
- for context, ``fine-tuned A (source)``: A + τ_A read through A's own head.

α is chosen on the validation split from (0, 0.25, 0.5, 1, 1.5, 2) (``--alphas``; the smallest on
ties); the test accuracy is at that α (the validation accuracy at every α is kept under
``validation_by_alpha``). ``seconds`` is the wall time of computing τ for B (statistics or votes,
maps, mask; Theseus included in GradFix's). Rows go to ``<out>/crosswidth.json``, with the settings.

Theseus settings: ``--center`` mean-centres the activation statistics (each site by its own means),
``--whiten p`` is the partial-whitening power (activation and data-free Theseus). Defaults: no
centring, ``p = 0``. Centring, ``p = 0.25`` and ``p = 0.5`` (each with and without centring) were
measured with seeds 0 1 2: no transported τ (Theseus, data-free, GradFix on Theseus) beat zero-shot
B on any task. α = 0 was chosen throughout but once (uncentred ``p = 0.5``, mnist: validation 0.372
vs 0.368 at α = 0.25, test 0.378 vs 0.409), so the defaults stay as they were.

Run:  python experiments/crosswidth.py --out docs/results/raw [--cache DIR] [--seeds 0 1 2]
          [--center] [--whiten P]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradfix import TaskVector, estimate_signs, mask_task_vector
from gradfix.io import load_state_dict
from gradfix.methods.theseus import theseus_data_free_task_vector, theseus_from_models
from gradfix.methods.transfusion import spec_for_module
from gradfix.zoo import build_scenario, get_scenario
from gradfix.zoo.vision import accuracy, as_float, head_loss, load_backbone, load_split, task_head

SCENARIO = "vision-widths"
ALPHAS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)
CENTER = False
WHITEN = 0.0


def truncate(tau: TaskVector, shapes: dict[str, tuple[int, ...]]) -> TaskVector:
    """``τ_A`` cut to the target's shapes: the first ``d_B`` entries along every axis."""
    return TaskVector({n: t[tuple(slice(0, s) for s in shapes[n])].clone() for n, t in tau.items()})


def draw_shots(labels: Tensor, k: int, seed: int) -> Tensor:
    """``k`` indices per class, drawn with ``seed`` (sorted)."""
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for c in sorted(int(c) for c in labels.unique()):
        pool = torch.nonzero(labels == c).flatten()
        picks.append(pool[torch.randperm(len(pool), generator=generator)[:k]])
    return torch.cat(picks).sort().values


class Evaluator:
    """B with its own prototype head; ``θ_B + α τ`` swapped in per evaluation."""

    def __init__(self, base: Path, data: Path, task: str, alphas: tuple[float, ...] = ALPHAS):
        self.alphas = alphas
        self.model = load_backbone(base)
        self.theta = {n: t.clone() for n, t in self.model.state_dict().items()}
        self.head, _ = task_head(self.model, data, task)
        self.splits = {s: load_split(data / task, s) for s in ("validation", "test")}

    def accuracy(self, tau: TaskVector | None, alpha: float, split: str) -> float:
        self.model.load_state_dict(self.theta if tau is None else tau.apply_to(self.theta, alpha))
        return accuracy(self.model, self.head, *self.splits[split])

    def at(self, tau: TaskVector | None, alpha: float) -> tuple[float, float]:
        """``(validation, test)`` accuracy of ``θ + α τ``."""
        return self.accuracy(tau, alpha, "validation"), self.accuracy(tau, alpha, "test")

    def pick_alpha(self, tau: TaskVector) -> tuple[float, float, float]:
        """``(α, validation, test)`` at the α (of ``alphas``) best on validation, the smallest on ties.

        ``self.curve`` keeps the validation accuracy at every α of the last call.
        """
        scores = {a: self.accuracy(tau, a, "validation") for a in self.alphas}
        self.curve = {f"{a:g}": scores[a] for a in self.alphas}
        best = max(self.alphas, key=lambda a: (scores[a], -a))
        return best, scores[best], self.accuracy(tau, best, "test")


def run_task(
    view: Path,
    task: str,
    seeds: list[int],
    shots: int = 5,
    stat_images: int = 512,
    scenario: str = SCENARIO,
    alphas: tuple[float, ...] = ALPHAS,
    center: bool = CENTER,
    whiten: float = WHITEN,
    curves: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Every method's row for one task of a built cross-width scenario folder ``view``.

    ``curves``, when given, gets ``{task, method, seed, validation_by_alpha}`` for every row whose α
    was chosen on validation.
    """
    data = view / "data"
    model_a, model_b = load_backbone(view / "A"), load_backbone(view / "B")
    tau_a = TaskVector.from_checkpoints(view / "A", view / f"A-ft/{task}")
    tau_b = TaskVector.from_checkpoints(view / "B", view / f"B-ft/{task}")
    evaluator = Evaluator(view / "B", data, task, alphas)
    train_x, train_y = load_split(data / task, "train")
    rows: list[dict[str, Any]] = []

    def row(
        method: str,
        alpha: float | None,
        val: float,
        test: float,
        seconds: float | None,
        curve: dict[str, float] | None = None,
        **seeded,
    ) -> None:
        rows.append({"scenario": scenario, "task": task, "method": method, "seed": None, "k": None})
        rows[-1].update(seeded, alpha=alpha, validation=val, test=test, seconds=seconds)
        if curve is not None and curves is not None:  # α picked on validation: accuracy at every α
            curves.append({"task": task, "method": method, "seed": rows[-1]["seed"]})
            curves[-1]["validation_by_alpha"] = curve
        texts = ("-" if v is None else f"{v:g}" for v in (rows[-1]["seed"], alpha))
        secs = "-" if seconds is None else f"{seconds:.2f}"
        print(f"{task:<12} {method:<26} {next(texts):>4} {next(texts):>5} {val:>7.3f} {test:>7.3f} {secs:>7}")

    source = Evaluator(view / "A", data, task)  # A + τ_A through A's own head
    row("fine-tuned A (source)", 1.0, *source.at(tau_a, 1.0), None)
    row("zero-shot B", None, *evaluator.at(None, 0.0), None)
    row("fine-tuned B", 1.0, *evaluator.at(tau_b, 1.0), None)

    start = time.perf_counter()
    naive = truncate(tau_a, {n: tuple(t.shape) for n, t in evaluator.theta.items()})
    row("naive (truncated τ_A)", *evaluator.pick_alpha(naive), time.perf_counter() - start, evaluator.curve)

    start = time.perf_counter()
    images = as_float(train_x[:stat_images])
    batches = list(images.split(128))
    theseus = theseus_from_models(tau_a, model_a, model_b, batches, center=center, whiten=whiten)
    theseus_seconds = time.perf_counter() - start
    row("Theseus (activations)", *evaluator.pick_alpha(theseus), theseus_seconds, evaluator.curve)

    start = time.perf_counter()
    spec = spec_for_module(model_a)
    sd_a, sd_b = load_state_dict(view / "A"), load_state_dict(view / "B")
    data_free = theseus_data_free_task_vector(tau_a, sd_a, sd_b, spec, whiten=whiten)
    row("Theseus (data-free)", *evaluator.pick_alpha(data_free), time.perf_counter() - start, evaluator.curve)

    loss = head_loss(evaluator.head)
    for seed in seeds:
        start = time.perf_counter()
        index = draw_shots(train_y, shots, seed)
        batch = {"inputs": as_float(train_x[index]), "labels": train_y[index]}
        votes = estimate_signs(model_b, [batch], loss, progress=False)
        masked = mask_task_vector(theseus, votes, "agreement")
        seconds = theseus_seconds + time.perf_counter() - start
        row("GradFix on Theseus", *evaluator.pick_alpha(masked), seconds, evaluator.curve, seed=seed, k=shots)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="docs/results/raw", help="folder for crosswidth.json")
    parser.add_argument(
        "--cache", default=None, help="zoo cache (default $GRADFIX_CACHE or ~/.cache/gradfix)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the shot draws")
    parser.add_argument("--tasks", nargs="+", default=None, help="tasks (default: all three)")
    parser.add_argument("--shots", type=int, default=5, help="training images per class for the votes")
    parser.add_argument("--stat-images", type=int, default=512, help="training images for Theseus statistics")
    parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS), help="α grid")
    parser.add_argument(
        "--center",
        action=argparse.BooleanOptionalAction,
        default=CENTER,
        help="mean-centre Theseus's activation statistics (per site)",
    )
    parser.add_argument(
        "--whiten", type=float, default=WHITEN, help="Theseus partial-whitening power p in [0, 0.5]"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the zoo's timings use 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    scenario = get_scenario(SCENARIO)
    view = build_scenario(scenario, args.cache, tasks=args.tasks, progress=False)
    print(f"\n{'task':<12} {'method':<26} {'seed':>4} {'α':>5} {'val':>7} {'test':>7} {'seconds':>7}")
    rows: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    for task in args.tasks or scenario.tasks:
        rows += run_task(
            view,
            task,
            args.seeds,
            args.shots,
            args.stat_images,
            alphas=tuple(args.alphas),
            center=args.center,
            whiten=args.whiten,
            curves=curves,
        )
    print("\nmean test accuracy over seeds (GradFix on Theseus):")
    for task in args.tasks or scenario.tasks:
        tests = [r["test"] for r in rows if r["task"] == task and r["method"] == "GradFix on Theseus"]
        print(f"  {task:<12} {sum(tests) / len(tests):.3f} ({len(tests)} seeds)")
    out = Path(args.out) / "crosswidth.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "experiment": "crosswidth",
        "command": shlex.join(["python", *sys.argv]),
        "center": args.center,
        "whiten": args.whiten,
        "alphas": list(args.alphas),
        "rows": rows,
        "validation_by_alpha": curves,
    }
    out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out} ({len(rows)} rows); wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
