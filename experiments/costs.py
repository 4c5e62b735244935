"""Wall time and peak memory of each way to get a task model on B, each in a fresh process.

On the text scenario's headline task (MiniLM, 5 classes): GradFix (the `gradfix transport` job:
votes on k shots per class, mask, write a complete model folder), the adaptive default of the same
job (the choice from the shots included), few-shot fine-tuning of B on the same shots (1 step and
30 steps), and the full fine-tune of B that the scenario's upper bound used (its recipe: 100 steps
of batch 32). Each runs in its own Python process; peak RSS is that process's maximum resident set
(imports and model loading included), wall time is the whole process.

Run:  python experiments/costs.py --out docs/results/raw [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

SCENARIO, TASK, K = "text-release-short", "headlines", 5

GRADFIX = """
from gradfix.jobs import MaskSettings, VoteSettings, transport_checkpoints
settings = VoteSettings(data=str(data / "train.jsonl"), shots={k}, template=task["template"],
                        max_length=task["max_length"], batch_size={k} * len(task["labels"]), progress=False)
masking = MaskSettings(alpha={alpha}, include=["encoder.*"])
transport_checkpoints(view / "A", view / "A-ft/{task_name}", view / "B", out / "{method}", settings, masking,
                      method="{method}")
"""

FINETUNE = """
import torch
from gradfix.data import load_examples, sample_shots
from gradfix.recipes import load_recipe
model, recipe = load_recipe("text-zero-shot", view / "B", task["labels"], template=task["template"],
                            max_length=task["max_length"])
params = [p for n, p in model.named_parameters() if n.startswith("encoder.")]
for n, p in model.named_parameters():
    p.requires_grad_(n.startswith("encoder."))
train = load_examples(data / "train.jsonl")
shots = sample_shots(train, {k}, 0, task["labels"])
optimizer = torch.optim.AdamW(params, lr=1e-4)
batch = recipe.collate(shots)
model.train()
for _ in range({steps}):
    optimizer.zero_grad()
    recipe.loss(model, batch).mean().backward()
    optimizer.step()
"""

FULL = """
from gradfix.data import load_examples
from gradfix.zoo.text import TextTask, finetune_zero_shot
from gradfix.zoo.training import TrainSettings
train = load_examples(data / "train.jsonl")
finetune_zero_shot(view / "B", out / "full", TextTask("{task_name}", task["template"], task["max_length"]),
                   task["labels"], train, TrainSettings(steps=100, lr=1e-4, batch_size=32, seed=2),
                   progress=False)
"""

PRELUDE = """
import json, sys, torch
from pathlib import Path
torch.set_num_threads({threads})
from gradfix.zoo import build_scenario, get_scenario
view = build_scenario(get_scenario("{scenario}"), {cache!r}, tasks=["{task_name}"], progress=False,
                      log=lambda m: None)
data = view / "data" / "{task_name}"
task = json.loads((data / "task.json").read_text())
out = Path({out!r})
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="docs/results/raw")
    parser.add_argument("--cache")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = []
    cases = [
        ("imports and loading only", "", "the scenario check and imports, nothing else"),
        (
            f"GradFix k={K} (gradfix transport --method gradfix)",
            GRADFIX.format(k=K, alpha=1.0, method="gradfix", task_name=TASK),
            f"votes on {K} shots per class, mask, write the model folder",
        ),
        (
            f"adaptive k={K} (gradfix transport default)",
            GRADFIX.format(k=K, alpha='"auto"', method="adaptive", task_name=TASK),
            "choice of t and α from the shots (2 folds), votes, mask, write",
        ),
        (f"few-shot FT k={K}, 1 step", FINETUNE.format(k=K, steps=1), "AdamW on the same shots"),
        (f"few-shot FT k={K}, 30 steps", FINETUNE.format(k=K, steps=30), "AdamW on the same shots"),
        (
            "full fine-tune of B (100 steps, batch 32)",
            FULL.format(task_name=TASK),
            "the scenario's fine-tuning recipe (upper bound), written to disk",
        ),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        # the first, uncounted run builds or checks the scenario and warms the file cache
        measure(
            PRELUDE.format(threads=args.threads, scenario=SCENARIO, cache=args.cache, task_name=TASK, out=tmp)
        )
        for method, body, detail in cases:
            prelude = PRELUDE.format(
                threads=args.threads, scenario=SCENARIO, cache=args.cache, task_name=TASK, out=tmp
            )
            # ru_maxrss of children is a maximum over every child so far, so each case gets its own
            # measuring process, which reports the peak of its one child
            wall, peak = measure(prelude + body)
            rows.append(
                {"method": method, "seconds": round(wall, 1), "peak_rss_mb": round(peak, 1), "detail": detail}
            )
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "experiment": "costs",
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "description": f"{SCENARIO}, task {TASK}: each method in a fresh process with {args.threads} torch "
        f"thread(s), on {os.cpu_count()} cores (whole-process wall time and peak RSS)",
        "rows": rows,
    }
    path = Path(args.out) / "costs.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path}")


def measure(code: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of ``code`` run by a fresh measuring process."""
    probe = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        f"subprocess.run([sys.executable, '-c', {code!r}], check=True)\n"
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    wall, peak = out.split()[-2:]
    return float(wall), float(peak)


if __name__ == "__main__":
    main()
