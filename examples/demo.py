"""GradFix end to end on a real model: carry a BBC-headline fine-tune of all-MiniLM-L6-v2 to a new release.

The scenario ``text-release-short`` (built on first use, then read from the cache; see
``gradfix zoo list`` and docs/scenarios.md):

- A is all-MiniLM-L6-v2 as published; B is a later "release" of it, built here by a short
  continued pre-training (unsupervised SimCSE) on Python standard-library docstrings;
- the task is the topic of BBC News headlines (5 classes), read through each model's own frozen
  zero-shot head (the class names in the prompt "This news article is about {label}.");
- τ_A = A fine-tuned on the task − A (encoder layers only); B's own fine-tune gives the oracle
  mask and the upper bound.

GradFix votes with B's per-sample gradient signs on k labelled headlines per class (drawn with a
fixed seed from the training split), keeps the coordinates of τ_A that agree, and adds them to B;
for these rows α is chosen on the validation split. The adaptive row is what `gradfix transport`
does by default: from the same shots alone (no validation data) it chooses how strongly the votes
must oppose a coordinate before it is dropped (t = 0 is GradFix, "naive" keeps everything) and α,
by 2-fold cross-validation of the loss over the shots. Accuracies are on the held-out test split.
The adaptive model is written as a complete Hugging Face folder by the `gradfix transport` job.

Run:  python examples/demo.py [--shots 2] [--seed 0] [--out demo-output] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from gradfix import TaskVector, estimate_signs, mask_task_vector
from gradfix.data import Example, load_examples, sample_shots
from gradfix.io import load_state_dict
from gradfix.jobs import MaskSettings, VoteSettings, transport_checkpoints
from gradfix.jobs.adaptive import correct_predictions
from gradfix.methods.autotune import choose_on_shots, gated
from gradfix.recipes import load_recipe
from gradfix.zoo import DEMO_SCENARIO, DEMO_TASK, build_scenario, get_scenario

ALPHAS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)
INCLUDE = "encoder.*"


class Evaluator:
    """B (eager attention, its own zero-shot head) with its weights swapped in place per update."""

    def __init__(self, target: Path, labels: list[str], template: str, max_length: int):
        self.model, self.recipe = load_recipe(
            "text-zero-shot", target, labels, template=template, max_length=max_length
        )
        self.theta = {n: t.detach().clone() for n, t in self.model.state_dict().items()}

    def accuracy(self, update: TaskVector | None, alpha: float, examples: list[Example]) -> float:
        """Accuracy of ``θ_B + α · update`` (``None``: θ_B itself) on ``examples``."""
        state = self.theta if update is None else update.apply_to(self.theta, alpha)
        self.model.load_state_dict(state)
        ordered = sorted(examples, key=lambda ex: len(ex.text))
        return self.recipe.accuracy(self.model, ordered, batch_size=128)

    def pick_alpha(self, update: TaskVector, validation: list[Example]) -> tuple[float, float]:
        """The α of :data:`ALPHAS` with the best validation accuracy (the smallest on ties)."""
        scores = {alpha: self.accuracy(update, alpha, validation) for alpha in ALPHAS}
        best = max(ALPHAS, key=lambda a: (scores[a], -a))
        return best, scores[best]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shots", type=int, default=2, help="labelled examples per class for the votes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw of the examples")
    parser.add_argument("--out", default="demo-output", help="folder for the transported model")
    parser.add_argument(
        "--cache", default=None, help="zoo cache (default $GRADFIX_CACHE or ~/.cache/gradfix)"
    )
    args = parser.parse_args()
    hf_logging.disable_progress_bar()  # the library's "Loading weights" bars; the zoo shows its own
    torch.manual_seed(0)
    start = time.perf_counter()

    view = build_scenario(get_scenario(DEMO_SCENARIO), args.cache, tasks=[DEMO_TASK])
    built = time.perf_counter() - start
    folder = view / "data" / DEMO_TASK
    task = json.loads((folder / "task.json").read_text(encoding="utf-8"))
    labels, template, max_length = task["labels"], task["template"], task["max_length"]
    train, validation, test = (load_examples(folder / f"{s}.jsonl") for s in ("train", "validation", "test"))
    base_a, ft_a, base_b, ft_b = (view / p for p in ("A", f"A-ft/{DEMO_TASK}", "B", f"B-ft/{DEMO_TASK}"))

    tau_a = TaskVector.from_checkpoints(base_a, ft_a, include=INCLUDE)
    tau_b = TaskVector.from_checkpoints(base_b, ft_b, include=INCLUDE)
    evaluator = Evaluator(base_b, labels, template, max_length)

    shots = sample_shots(train, args.shots, args.seed, labels)
    for name, param in evaluator.model.named_parameters():
        param.requires_grad_(name.startswith("encoder."))
    batch = evaluator.recipe.collate(shots)
    votes = estimate_signs(evaluator.model, [batch], evaluator.recipe.loss, progress=False)
    gradfix = mask_task_vector(tau_a, votes, "agreement")
    oracle = mask_task_vector(tau_a, tau_b, "agreement")

    rows: list[tuple[str, str, float | None, float]] = []
    rows.append(("zero-shot B", "-", None, evaluator.accuracy(None, 0.0, test)))
    for name, update in (
        ("naive B + α τ_A", tau_a),
        (f"GradFix k={args.shots}", gradfix),
        ("oracle mask (uses τ_B)", oracle),
    ):
        alpha, val = evaluator.pick_alpha(update, validation)
        rows.append((name, f"{alpha:g}", val, evaluator.accuracy(update, alpha, test)))
    evaluator.model.load_state_dict(evaluator.theta)  # θ_B again: the choice starts from B
    choice = choose_on_shots(
        evaluator.model,
        tau_a,
        shots,
        [ex.label for ex in shots],
        evaluator.recipe.collate,
        evaluator.recipe.loss,
        seed=args.seed,
        correct=correct_predictions(evaluator.recipe),
    )
    adaptive = gated(tau_a, votes, choice.threshold)
    t_text = "naive" if choice.threshold > 1 else f"{choice.threshold:g}"
    rows.append(
        (
            f"adaptive k={args.shots} (t={t_text})",
            f"{choice.alpha:g}",
            None,
            evaluator.accuracy(adaptive, choice.alpha, test),
        )
    )
    rows.append(("fine-tuned B (upper bound)", "1", None, evaluator.accuracy(tau_b, 1.0, test)))
    source = Evaluator(base_a, labels, template, max_length)
    source_scores = (source.accuracy(None, 0.0, test), source.accuracy(tau_a, 1.0, test))

    out = Path(args.out) / f"{DEMO_SCENARIO}-{DEMO_TASK}-adaptive-k{args.shots}"
    votes_settings = VoteSettings(
        data=str(folder / "train.jsonl"),
        shots=args.shots,
        seed=args.seed,
        template=template,
        max_length=max_length,
        batch_size=len(shots),
        progress=False,
    )
    masking = MaskSettings(alpha="auto", include=[INCLUDE])
    record = transport_checkpoints(
        base_a, ft_a, base_b, out, votes_settings, masking, overwrite=True, method="adaptive"
    )
    written = load_state_dict(out)
    expected = adaptive.apply_to(evaluator.theta, choice.alpha)
    same = all(torch.equal(written[n], expected[n]) for n in tau_a)

    print(f"\n{DEMO_SCENARIO}: topic of BBC News headlines ({len(labels)} classes)")
    built_here = get_scenario(DEMO_SCENARIO).built.split(";")[0]
    print(f"  A = all-MiniLM-L6-v2; {built_here}")
    print(f"  source A on test: zero-shot {source_scores[0]:.3f}, fine-tuned {source_scores[1]:.3f}")
    print(f"  GradFix votes on {len(shots)} training headlines ({args.shots} per class, seed {args.seed})")
    print(f"  α of the GradFix, naive and oracle rows chosen on {len(validation)} validation headlines;")
    print(f"  t and α of the adaptive row chosen from the {len(shots)} shots alone")
    print(f"  test on {len(test)} held-out headlines\n")
    print_table(rows)
    report = record.get("descent") or {}
    print(
        f"\nthe adaptive transport kept {report.get('kept_fraction', float('nan')):.1%} of τ_A's "
        "non-zero coordinates; "
        f"first-order loss change <g, Δ> = {report.get('total_inner', float('nan')):.3e}"
    )
    agreement = "the same weights as" if same else "weights that DIFFER from"
    print(f"gradfix transport's default (t = {t_text}, α = {choice.alpha:g}) wrote {out}/")
    print(f"  ({agreement} the adaptive row)")
    print(f"  evaluate it:  gradfix eval --model {out} --data {folder / 'test.jsonl'}")
    print(f"scenario folder: {view}")
    total = time.perf_counter() - start
    print(f"wall time {total:.0f} s (building or checking the cache: {built:.0f} s)")


def print_table(rows: list[tuple[str, str, float | None, float]]) -> None:
    """The accuracy table, with the share of the zero-shot → fine-tuned gap each method closes."""
    zero, top = rows[0][3], rows[-1][3]
    print(f"{'method':<28} {'α':>5} {'validation':>11} {'test':>7} {'gap closed':>11}")
    for name, alpha, val, acc in rows:
        gap = (acc - zero) / (top - zero) if top != zero else float("nan")
        val_text = f"{val:.3f}" if val is not None else "-"
        print(f"{name:<28} {alpha:>5} {val_text:>11} {acc:>7.3f} {gap:>10.0%}")


if __name__ == "__main__":
    main()
