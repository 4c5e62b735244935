"""Cross-width transport on text: all-MiniLM-L6-v2's task vector onto a narrower encoder distilled from it.

Scenario ``text-narrow`` (built on first use, then read from the cache; docs/scenarios.md): A is
all-MiniLM-L6-v2 (hidden 384, 12 heads, FFN 1536), B a BERT of hidden 256, 8 heads of 32 and FFN
1024 initialised from A's units of largest activation variance and distilled from A's sentence
embeddings on Python's docstrings. ``τ_A`` = A fine-tuned on the task − A (``encoder.*``) has
other shapes than B's parameters.

Per task (headlines by default), B's test accuracy through its own frozen zero-shot head after
``θ_B + α τ`` (the environment of ``experiments/envs.py``: α chosen on its 250 validation
examples from its grid, the smallest on ties):

- ``zero-shot B`` (τ = 0), ``fine-tuned B`` (τ_B at α = 1: the upper bound) and, for context,
  ``fine-tuned A (source)`` (A + τ_A through A's own head);
- ``naive (truncated τ_A)``: the first d_B entries of every axis of ``τ_A``;
- ``Theseus (data-free)``: the maps from the two bases' weights (word embeddings included);
- ``Theseus (activations)``: the maps from A's and B's activations on k = 1, 2, 5 training
  texts per class (the draws of Table 1, per seed) and on 64 and 256 training texts drawn
  without regard to class (``Theseus (activations, n texts)``, per seed);
- ``GradFix on Theseus``: the k = 5 Theseus τ masked where B's sign votes on the same shots
  disagree with it (agreement mask).

``cli`` in the record: ``gradfix transport --method theseus --data <the k = 5 shots of seed 0>``
at the library's chosen α, then ``gradfix eval`` of the written model on the test split; the two
accuracies and the largest difference between the CLI's and the library's τ.

Run:  python experiments/crosswidth_text.py --out docs/results/raw [--cache DIR] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from crosswidth import truncate
from envs import ALPHAS, TextEnv

from gradfix import TaskVector, mask_task_vector
from gradfix.data import batched
from gradfix.io import load_state_dict
from gradfix.methods.theseus import theseus_data_free_task_vector, theseus_from_models
from gradfix.zoo import build_scenario, get_scenario

SCENARIO = "text-narrow"
SHOTS = (1, 2, 5)
TEXTS = (64, 256)
CAPTION = (
    "all-MiniLM-L6-v2's task vector (hidden 384, 12 heads) onto a narrower encoder distilled from it "
    "(hidden 256, 8 heads, FFN 1024)"
)


def _encoder_only(model: torch.nn.Module, batch: Any) -> Any:
    return model(**{k: v for k, v in batch.items() if k != "labels"})


class Measure:
    """Rows of one task: every update measured on the environment, α on validation."""

    def __init__(self, env: TextEnv, alphas: Sequence[float], saved: Callable[[], None] = lambda: None):
        self.env, self.alphas, self.saved = env, tuple(alphas), saved
        self.rows: list[dict[str, Any]] = []
        self.curves: list[dict[str, Any]] = []
        self.cli: dict[str, Any] = {}

    def add(self, method: str, update: TaskVector | None, seconds: float | None, **fields: Any) -> dict:
        """Measure ``update`` (``None``: B itself; ``fields`` may fix ``alpha``) and keep its row."""
        env = self.env
        row: dict[str, Any] = {"scenario": env.scenario, "task": env.task, "method": method}
        row.update({"seed": None, "k": None}, **fields)
        if update is None or "alpha" in fields:
            alpha = fields.get("alpha", 0.0)
            row.update(
                validation=env.accuracy(update, alpha, "validation"), test=env.accuracy(update, alpha, "test")
            )
        else:
            sweep = env.sweep(update, self.alphas)
            curve = sweep.pop("validation_by_alpha")
            self.curves.append(
                {"task": env.task, "method": method, "seed": row["seed"], "validation_by_alpha": curve}
            )
            row.update(alpha=sweep["alpha"], validation=sweep["validation"], test=sweep["test"])
        row["seconds"] = None if seconds is None else round(seconds, 2)
        self.rows.append(row)
        shown = " ".join(
            f"{k}={row[k]}" for k in ("seed", "k", "examples", "alpha") if row.get(k) is not None
        )
        print(
            f"{env.task:<10} {method:<36} {shown:<28} val {row['validation']:.3f} test {row['test']:.3f}",
            flush=True,
        )
        self.saved()
        return row


def timed(make: Callable[[], TaskVector]) -> tuple[TaskVector, float]:
    """``make()`` and its wall time."""
    start = time.perf_counter()
    value = make()
    return value, time.perf_counter() - start


def draw_texts(pool: int, n: int, seed: int) -> list[int]:
    """``n`` training indices drawn without regard to class (sorted)."""
    return sorted(random.Random(seed).sample(range(pool), n))


def run_task(
    view: Path, task: str, seeds: Sequence[int], alphas: Sequence[float], measure_cli: bool, save: Callable
) -> Measure:
    """Every row of ``task`` (``save(measure)`` after each), the CLI check after the first seed."""
    env = TextEnv(view, task, scenario=SCENARIO)
    source = TextEnv(view, task, target="A", scenario=SCENARIO)
    model_a = source.model
    measure = Measure(env, alphas)
    measure.saved = lambda: save(measure)
    measure.rows.append(Measure(source, alphas).add("fine-tuned A (source)", source.tau_a, None, alpha=1.0))
    measure.add("zero-shot B", None, None)
    measure.add("fine-tuned B", env.tau_b, None, alpha=1.0)
    shapes = {n: tuple(t.shape) for n, t in env.theta.items()}
    measure.add("naive (truncated τ_A)", *timed(lambda: truncate(env.tau_a, shapes)))
    sd_a, sd_b = load_state_dict(view / "A"), load_state_dict(view / "B")
    heads = (int(model_a.config.num_attention_heads), int(env.model.config.num_attention_heads))
    data_free = lambda: theseus_data_free_task_vector(  # noqa: E731
        env.tau_a, sd_a, sd_b, num_heads=heads[0], target_num_heads=heads[1]
    )
    measure.add("Theseus (data-free)", *timed(data_free))

    def theseus(indices: Sequence[int]) -> TaskVector:
        env.set_weights(None)
        batches = [env.collate(chunk) for chunk in batched(list(indices), 64)]
        return theseus_from_models(env.tau_a, model_a, env.model, batches, forward_fn=_encoder_only)

    cli: dict[str, Any] = {}
    for seed in seeds:
        for k in SHOTS:
            shots = env.shots(k, seed)
            tau, seconds = timed(lambda shots=shots: theseus(shots))
            row = measure.add("Theseus (activations)", tau, seconds, seed=seed, k=k, examples=len(shots))
            if k == 5:
                start = time.perf_counter()
                masked = mask_task_vector(tau, env.votes(shots), "agreement")
                elapsed = seconds + time.perf_counter() - start
                measure.add("GradFix on Theseus", masked, elapsed, seed=seed, k=k, examples=len(shots))
                if not cli:
                    cli = {
                        "shots": shots,
                        "seed": seed,
                        "alpha": row["alpha"],
                        "library_test": row["test"],
                        "tau": tau,
                    }
        for n in TEXTS:
            indices = draw_texts(len(env.train), n, seed)
            tau, seconds = timed(lambda indices=indices: theseus(indices))
            measure.add(f"Theseus (activations, {n} texts)", tau, seconds, seed=seed, examples=n)
        if cli and measure_cli and not measure.cli:
            measure.cli = cli_check(view, task, env, cli)
            print(f"CLI check: library {measure.cli['library_test']:.4f}, CLI {measure.cli['cli_test']:.4f}")
            save(measure)
    return measure


def gradfix_cli(*args: str) -> subprocess.CompletedProcess:
    """``gradfix ARGS`` with this interpreter (the CLI's entry point), failing loudly."""
    code = "import sys; from gradfix.cli.main import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)


def cli_check(view: Path, task: str, env: TextEnv, check: dict[str, Any]) -> dict[str, Any]:
    """The seed's k = 5 Theseus through ``gradfix transport`` and ``gradfix eval``, beside the library's."""
    info = json.loads((view / "data" / task / "task.json").read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        shots_file, out = Path(tmp) / "shots.jsonl", Path(tmp) / "out"
        lines = [json.dumps({"text": env.train[i].text, "label": env.train[i].label}) for i in check["shots"]]
        shots_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
        common = ["--template", info["template"], "--max-length", str(info["max_length"])]
        transport = [
            "transport", "--source-base", str(view / "A"), "--source-finetuned", str(view / f"A-ft/{task}"),
            "--target-base", str(view / "B"), "--method", "theseus", "--data", str(shots_file),
            "--shots", "5", "--seed", str(check["seed"]), "--include", "encoder.*",
            "--alpha", f"{check['alpha']:g}", *common, "--no-progress", "--out", str(out),
        ]  # fmt: skip
        gradfix_cli(*transport)
        evaluated = gradfix_cli(
            "eval", "--model", str(out), "--data", str(view / "data" / task / "test.jsonl"), *common, "--json"
        )
        record = json.loads((out / "gradfix.json").read_text(encoding="utf-8"))
        written = load_state_dict(out)
    alpha = check["alpha"]
    diff = max(
        float((written[n].double() - env.theta[n].double() - alpha * t.double()).abs().max())
        for n, t in check["tau"].items()
    )
    return {
        "command": shlex.join(["gradfix", *transport]).replace(str(view), "$(gradfix zoo path text-narrow)"),
        "seed": check["seed"],
        "alpha": alpha,
        "examples": len(check["shots"]),
        "theseus_record": {k: record.get("theseus", {}).get(k) for k in ("from", "examples", "tokens")},
        "library_test": check["library_test"],
        "cli_test": json.loads(evaluated.stdout)["accuracy"],
        "max_abs_weight_difference": diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="docs/results/raw", help="folder for crosswidth-text-narrow.json")
    parser.add_argument(
        "--cache", default=None, help="zoo cache (default $GRADFIX_CACHE or ~/.cache/gradfix)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the draws")
    parser.add_argument("--tasks", nargs="+", default=["headlines"], help="tasks (default: headlines)")
    parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS), help="α grid")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--no-cli", action="store_true", help="skip the CLI check")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    scenario = get_scenario(SCENARIO)
    view = build_scenario(scenario, args.cache, tasks=args.tasks, progress=False)
    manifest = json.loads((view / "manifest.json").read_text(encoding="utf-8"))
    out = Path(args.out) / f"crosswidth-{SCENARIO}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    done: list[Measure] = []

    def save(current: Measure) -> None:  # after every row: an interrupted run keeps what it measured
        measures = [*done, current]
        record = {
            "experiment": "crosswidth",
            "scenario": SCENARIO,
            "caption": CAPTION,
            "command": shlex.join(["python", *sys.argv]),
            "alphas": list(args.alphas),
            "B": manifest["entries"]["B"].get("details", {}),
            "rows": [row for m in measures for row in m.rows],
            "validation_by_alpha": [curve for m in measures for curve in m.curves],
            "cli": next((m.cli for m in measures if m.cli), {}),
        }
        out.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    for task in args.tasks:
        done.append(run_task(view, task, args.seeds, args.alphas, not args.no_cli and not done, save))
    rows = sum(len(m.rows) for m in done)
    print(f"wrote {out} ({rows} rows); wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
