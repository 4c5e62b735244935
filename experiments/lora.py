"""A LoRA fine-tune of all-MiniLM-L6-v2 carried onto its later releases, as full weights and as adapters.

A user's fine-tune is most often a PEFT LoRA adapter. This experiment trains one on A (the BBC
headline task of ``text-release-*``, through A's own frozen zero-shot head: LoRA on every encoder
projection), then runs ``gradfix transport`` with the adapter folder as ``--source-finetuned`` onto
B of each drift level: naive addition, GradFix (α = 1, k shots per class) and the default
(adaptive, chosen from the shots alone), each written as full weights and as a LoRA adapter for B
at several ranks (``--out-format adapter --adapter-rank R``, loaded back with
``PeftModel.from_pretrained``). Accuracies are on the held-out test split, read through B's own
zero-shot head.

Run:  python experiments/lora.py [--levels short long] [--ranks 8 16 64] [--seeds 0 1 2]
                                 [--out docs/results/raw/lora.json] [--cache DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from gradfix.cli.main import main as gradfix_main
from gradfix.data import Example, load_examples
from gradfix.io import load_state_dict
from gradfix.recipes import load_recipe
from gradfix.zoo import build_scenario, get_scenario
from gradfix.zoo.cache import cache_root
from gradfix.zoo.text import accuracy, load_encoder, quiet_hf, zero_shot_recipe
from gradfix.zoo.text_scenarios import TEXT_TASKS
from gradfix.zoo.training import TrainSettings, seeded_batches, train

TASK = "headlines"
LORA = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "target_modules": r".*encoder.*\.(query|key|value|dense)",
}
TRAIN = TrainSettings(steps=100, lr=1e-3, batch_size=32, weight_decay=0.0, seed=2)
METHODS = {"naive": ["--method", "naive"], "gradfix": ["--method", "gradfix"], "default": []}


def train_adapter(scenario: Path, work: Path) -> tuple[Path, dict[str, Any]]:
    """The LoRA fine-tune of A on the task (cached in ``work`` under a key of its settings)."""
    import peft

    settings = {"lora": LORA, "train": TRAIN.to_dict(), "task": TASK, "peft": peft.__version__}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = work / f"A-lora-{TASK}-{key}"
    if (folder / "record.json").exists():
        return folder / "adapter", json.loads((folder / "record.json").read_text())
    data = scenario / "data" / TASK
    labels = json.loads((data / "task.json").read_text())["labels"]
    model, tokenizer = load_encoder(scenario / "A")
    recipe = zero_shot_recipe(model, tokenizer, labels, TEXT_TASKS[TASK])  # A's own head, frozen
    validation = load_examples(data / "validation.jsonl")
    before = accuracy(model, recipe, validation)
    lora = peft.get_peft_model(model, peft.LoraConfig(**LORA))
    batches = seeded_batches(load_examples(data / "train.jsonl"), TRAIN.batch_size, TRAIN.seed)
    params = [p for p in lora.parameters() if p.requires_grad]
    record = train(
        model, params, lambda step: recipe.loss(model, recipe.collate(next(batches))).mean(), TRAIN
    )
    record.update(
        settings, validation_zero_shot=before, validation_finetuned=accuracy(model, recipe, validation)
    )
    record["trainable_parameters"] = sum(p.numel() for p in params)
    tmp = folder.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lora.save_pretrained(tmp / "adapter")
    (tmp / "record.json").write_text(json.dumps(record, indent=2) + "\n")
    tmp.rename(folder)
    return folder / "adapter", record


class Evaluator:
    """B with its own frozen zero-shot head; the weights of each output are loaded into it."""

    def __init__(self, b: Path, labels: list[str], test: list[Example]):
        task = TEXT_TASKS[TASK]
        self.b, self.test = b, sorted(test, key=lambda ex: len(ex.text))
        self.model, self.recipe = load_recipe(
            "text-zero-shot", b, labels, template=task.template, max_length=task.max_length
        )
        self.theta = {n: t.detach().clone() for n, t in self.model.state_dict().items()}

    def __call__(self, state: dict[str, torch.Tensor] | None) -> float:
        """Test accuracy (%) of B with ``state``'s tensors (``None``: B itself)."""
        self.model.load_state_dict({**self.theta, **(state or {})})
        return 100 * self.recipe.accuracy(self.model, self.test, batch_size=128)

    def adapter_state(self, folder: Path) -> dict[str, torch.Tensor]:
        """B's weights with a written adapter merged by PEFT itself."""
        import peft
        from transformers import AutoModel

        base = AutoModel.from_pretrained(self.b)
        merged = peft.PeftModel.from_pretrained(base, folder).merge_and_unload()
        return {n: t.detach() for n, t in merged.state_dict().items()}


def transport(
    scenario: Path, b: Path, adapter: Path, out: Path, method: str, seed: int, *extra: str
) -> dict[str, Any]:
    """One ``gradfix transport`` run; returns its ``gradfix.json`` record."""
    data = scenario / "data" / TASK / "train.jsonl"
    args = ["transport", "--source-base", str(scenario / "A"), "--source-finetuned", str(adapter),
            "--target-base", str(b), "--data", str(data), "--shots", str(ARGS.shots),
            "--seed", str(seed), "--template", TEXT_TASKS[TASK].template,
            "--max-length", str(TEXT_TASKS[TASK].max_length), "--out", str(out), "--no-progress",
            *METHODS[method], *extra]  # fmt: skip
    if gradfix_main(args) != 0:
        raise SystemExit(f"gradfix {' '.join(args)} failed")
    return json.loads((out / "gradfix.json").read_text())


def run_level(level: str, work: Path) -> dict[str, Any]:
    """Every row of one drift level."""
    with quiet_hf():
        scenario = build_scenario(get_scenario(f"text-release-{level}"), ARGS.cache, tasks=[], progress=False)
        adapter, trained = train_adapter(scenario, work)
    data = scenario / "data" / TASK
    labels = json.loads((data / "task.json").read_text())["labels"]
    evaluate = Evaluator(scenario / "B", labels, load_examples(data / "test.jsonl"))
    rows: list[dict[str, Any]] = [{"method": "zero-shot B", "accuracy": evaluate(None)}]
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            for seed in ARGS.seeds if method != "naive" else ARGS.seeds[:1]:
                out = Path(tmp) / f"{method}-{seed}"
                record = transport(scenario, scenario / "B", adapter, out, method, seed)
                row = {"method": method, "seed": seed, "output": "full", "choice": record.get("choice")}
                rows.append({**row, "accuracy": evaluate(load_state_dict(out)), "alpha": record.get("alpha")})
                shutil.rmtree(out)
                if seed != ARGS.seeds[0]:
                    continue
                for rank in ARGS.ranks:
                    out = Path(tmp) / f"{method}-{seed}-r{rank}"
                    record = transport(scenario, scenario / "B", adapter, out, method, seed,
                                       "--out-format", "adapter", "--adapter-rank", str(rank))  # fmt: skip
                    energy = record.get("adapter", {}).get("kept_share")
                    rows.append({**row, "output": f"adapter r={rank}", "energy_kept": energy,
                                 "accuracy": evaluate(evaluate.adapter_state(out))})  # fmt: skip
                    shutil.rmtree(out)
    a_ft = {
        "validation_zero_shot": trained["validation_zero_shot"],
        "validation_finetuned": trained["validation_finetuned"],
    }
    return {"level": level, "drift_scenario": f"text-release-{level}", "lora_on_A": a_ft, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--levels", nargs="+", default=["short", "long"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[8, 16, 64])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="docs/results/raw/lora.json")
    parser.add_argument(
        "--cache", default=None, help="zoo cache (default $GRADFIX_CACHE or ~/.cache/gradfix)"
    )
    global ARGS
    ARGS = parser.parse_args()
    if ARGS.threads:
        torch.set_num_threads(ARGS.threads)
    work = cache_root(ARGS.cache) / "experiments"
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = [run_level(level, work) for level in ARGS.levels]
    payload = {
        "experiment": "lora",
        "command": "python " + " ".join(["experiments/lora.py", *sys.argv[1:]]),
        "task": TASK,
        "shots": ARGS.shots,
        "lora": LORA,
        "train": TRAIN.to_dict(),
        "levels": results,
        "seconds": round(time.perf_counter() - start, 1),
    }
    Path(ARGS.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ARGS.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))


ARGS: argparse.Namespace

if __name__ == "__main__":
    main()
