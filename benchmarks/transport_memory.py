"""Peak memory of ``gradfix transport`` against the size of the checkpoints it reads.

Part 1, synthetic: three checkpoints of ``--gb`` GB each (fp32; one tensor of ``--largest-mb`` MB,
the rest 64 MB each) and a votes file are written to a temporary folder (deleted afterwards);
``gradfix transport --votes-in`` applies the GradFix mask and writes the result. The floor: peak
RSS below 3 × the largest tensor + 300 MB, whatever the checkpoint size.

Part 2, real: the whole ``gradfix transport`` on all-MiniLM-L6-v2 (source fine-tune and target
made by adding seeded noise to it), voting on 2 BBC sentences per class: the published
algorithm (``--method gradfix``) and the default (``--method adaptive --alpha auto``).
Reported against the fp32 model size, after subtracting the RSS of a process that only imports
torch, transformers and gradfix. The vote holds its counts only (int8 below 128 samples);
a run with ``--votes-out`` keeps the float32 gradient sums as well (they are saved), for comparison.

Part 3, state: the vote's own memory per voting parameter on MiniLM (the running sums the vote
engine holds at the end of the vote, read from its accumulator), with the gradient sums kept
(``gradient="sum"``, the library default) and without (``gradient="none"``, what a transport uses),
over every tensor and over a LoRA-like selection (the attention query and value weights: a task
vector that changes only those votes only on those, the others need no gradient). Ends with the
machine-readable ``state_bytes_per_voting_param=<x>`` of the counts-only vote.

Each run is a fresh process; its peak RSS is its own ``ru_maxrss``.
Run:  python benchmarks/transport_memory.py [--gb 2] [--largest-mb 256] [--skip-minilm] [--skip-synthetic]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gradfix.io.streaming import StreamingSafetensorsFile, StreamingShardedWriter, TensorPlan

_RUNNER = (
    "import resource, sys\n"
    "from gradfix.cli.main import main\n"
    "code = main(sys.argv[1:])\n"
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(code)\n"
)
_BASELINE = (
    "import resource, sys, torch, transformers, gradfix.cli.main, gradfix.jobs\n"
    "if sys.argv[1:]:\n"
    "    from gradfix.recipes import load_recipe\n"
    "    model, recipe = load_recipe('text-zero-shot', sys.argv[1], sys.argv[2].split(','))\n"
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
)


def run_measured(code: str, args: list[str]) -> tuple[float, float]:
    """Run ``code`` in a fresh interpreter; return (peak RSS in MB, wall seconds)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}):\n{done.stderr[-3000:]}")
    line = next(x for x in done.stderr.splitlines() if x.startswith("PEAK_RSS_KB"))
    return int(line.split()[1]) / 1024, wall


def synthetic_plan(gb: float, largest_mb: int) -> list[TensorPlan]:
    """One large tensor, 64 MB tensors and small biases adding up to about ``gb`` GB of fp32."""
    cols = 4096
    plan = [TensorPlan("embed.weight", torch.float32, (largest_mb * 2**20 // (4 * cols), cols))]
    total = plan[0].nbytes
    i = 0
    while total < gb * 2**30:
        plan.append(TensorPlan(f"layer.{i}.weight", torch.float32, (4096, cols)))
        plan.append(TensorPlan(f"layer.{i}.bias", torch.float32, (cols,)))
        total += plan[-1].nbytes + plan[-2].nbytes
        i += 1
    return plan


def write_checkpoint(folder: Path, plan: list[TensorPlan], seed: int, base_seed: int | None = None) -> None:
    """A checkpoint of random tensors; with ``base_seed``, that checkpoint plus small noise."""
    folder.mkdir(parents=True)
    writer = StreamingShardedWriter(folder, plan, 1 << 30)
    for k, t in enumerate(plan):
        rows = max(1, (64 << 20) // max(1, math.prod(t.shape[1:]) * 4))
        for start in range(0, t.shape[0], rows):
            shape = (min(rows, t.shape[0] - start), *t.shape[1:])
            gen = torch.Generator().manual_seed(
                (base_seed if base_seed is not None else seed) * 100003 + k * 7919 + start
            )
            chunk = torch.randn(shape, generator=gen) * 0.02
            if base_seed is not None:
                noise = torch.Generator().manual_seed(seed * 100003 + k * 7919 + start)
                chunk += torch.randn(shape, generator=noise) * 1e-3
            writer.write(t.name, chunk)
    writer.close()
    (folder / "config.json").write_text("{}\n")


def write_votes(path: Path, plan: list[TensorPlan], samples: int = 10) -> None:
    """A votes file (the format ``SignVotes.save`` writes) with random counts and gradient sums."""
    parts = [TensorPlan(f"counts/{t.name}", torch.int8, t.shape) for t in plan]
    parts += [TensorPlan(f"grad_sum/{t.name}", torch.float32, t.shape) for t in plan]
    meta = {
        "gradfix_kind": "gradfix.sign_votes",
        "num_samples": str(samples),
        "estimator": "majority",
        "hits": json.dumps({t.name: samples for t in plan}),
    }
    out = StreamingSafetensorsFile(path, parts, meta)
    gen = torch.Generator().manual_seed(0)
    for part in parts:
        rows = max(1, (64 << 20) // max(1, math.prod(part.shape[1:]) * 4))
        for start in range(0, part.shape[0], rows):
            shape = (min(rows, part.shape[0] - start), *part.shape[1:])
            if part.dtype == torch.int8:
                out.write(
                    part.name, torch.randint(-samples, samples + 1, shape, generator=gen, dtype=torch.int8)
                )
            else:
                out.write(part.name, torch.randn(shape, generator=gen) * 1e-3)
    out.close()


def synthetic(gb: float, largest_mb: int) -> None:
    plan = synthetic_plan(gb, largest_mb)
    largest = max(t.nbytes for t in plan) / 2**20
    size = sum(t.nbytes for t in plan) / 2**30
    root = Path(tempfile.mkdtemp(prefix="gradfix-mem-"))
    try:
        start = time.perf_counter()
        write_checkpoint(root / "A", plan, seed=1)
        write_checkpoint(root / "A-ft", plan, seed=2, base_seed=1)
        write_checkpoint(root / "B", plan, seed=3)
        write_votes(root / "votes.safetensors", plan)
        print(
            f"synthetic: 3 checkpoints of {size:.2f} GB ({len(plan)} tensors, largest {largest:.0f} MB) "
            f"and votes written in {time.perf_counter() - start:.0f} s"
        )
        args = [
            "transport",
            "--source-base",
            str(root / "A"),
            "--source-finetuned",
            str(root / "A-ft"),
            "--target-base",
            str(root / "B"),
            "--votes-in",
            str(root / "votes.safetensors"),
            "--method",
            "gradfix",
            "--alpha",
            "1.0",
            "--out",
            str(root / "out"),
            "--shard-size",
            "1GB",
            "--no-progress",
        ]
        peak, wall = run_measured(_RUNNER, args)
        floor = 3 * largest + 300
        print(
            f"gradfix transport: peak RSS {peak:.0f} MB in {wall:.0f} s; "
            f"{peak / largest:.2f} x the largest tensor; floor 3 x {largest:.0f} + 300 = {floor:.0f} MB: "
            f"{'met' if peak < floor else 'NOT met'}"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def minilm() -> None:
    from gradfix.data import Example
    from gradfix.io import load_state_dict, save_state_dict

    sys.path.insert(0, str(Path(__file__).parent))
    from votes_speed import LABELS, bbc_sentences, minilm_folder

    folder = minilm_folder()
    root = Path(tempfile.mkdtemp(prefix="gradfix-minilm-"))
    try:
        base = load_state_dict(folder)
        model_mb = sum(t.numel() * 4 for t in base.values()) / 2**20
        for name, seed in (("A-ft", 1), ("B", 2)):
            gen = torch.Generator().manual_seed(seed)
            noisy = {
                k: v + 1e-3 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                for k, v in base.items()
            }
            shutil.copytree(folder, root / name, ignore=shutil.ignore_patterns("*.safetensors"))
            save_state_dict(noisy, root / name)
        examples: list[Example] = bbc_sentences(40)
        data = root / "few.jsonl"
        data.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in examples))
        del base, noisy
        args = [
            "transport",
            "--source-base",
            str(folder),
            "--source-finetuned",
            str(root / "A-ft"),
            "--target-base",
            str(root / "B"),
            "--data",
            str(data),
            "--shots",
            "2",
            "--exclude",
            "pooler.*",
            "--exclude",
            "embeddings.word_embeddings.*",
            "--out",
            str(root / "out"),
            "--no-progress",
        ]
        baseline, _ = run_measured(_BASELINE, [])
        loaded, _ = run_measured(_BASELINE, [str(root / "B"), ",".join(LABELS)])
        print(
            f"\nall-MiniLM-L6-v2 ({model_mb:.0f} MB in fp32), {len(LABELS)} classes x 2 shots; imports alone "
            f"{baseline:.0f} MB, imports + model loaded by transformers {loaded:.0f} MB"
        )
        # the published algorithm (batch 1: activations of one sample only), then the default
        # (adaptive: τ_A held in memory while t and α are chosen on the shots)
        runs = [("gradfix", "1.0", 8, False), ("gradfix", "1.0", 8, True), ("gradfix", "1.0", 1, False)]
        for method, alpha, batch, saved in [*runs, ("adaptive", "auto", 8, False)]:
            out = root / f"out-{method}-{batch}-{saved}"
            settings = ["--method", method, "--alpha", alpha, "--batch-size", str(batch)]
            if saved:  # the votes are saved: the gradient sums are kept while voting
                settings += ["--votes-out", str(root / f"votes-{batch}.safetensors")]
            peak, wall = run_measured(_RUNNER, [*args[:-3], "--out", str(out), *settings, "--no-progress"])
            state = json.loads((out / "gradfix.json").read_text())["data"]
            print(
                f"  --method {method} --alpha {alpha}, batch {batch}{', --votes-out' if saved else ''}: "
                f"peak RSS {peak:.0f} MB in {wall:.0f} s; (peak - imports) / model = "
                f"{(peak - baseline) / model_mb:.2f}; {state['voted_parameters'] / 1e6:.1f} M parameters "
                f"voted, gradient sums {'kept' if state['gradient'] == 'sum' else 'not kept'}"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def vote_state_watch() -> Iterator[list[int]]:
    """Within the block, every vote appends the bytes of its running sums (counters and gradient
    sums) as they stand at the end of the vote, when every one of them has been made."""
    from gradfix.votes import accumulator

    seen: list[int] = []
    result = accumulator.Accumulator.result

    def measured(self: accumulator.Accumulator, estimator: str) -> object:
        seen.append(self.state_bytes())
        return result(self, estimator)  # type: ignore[arg-type]

    accumulator.Accumulator.result = measured  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        accumulator.Accumulator.result = result  # type: ignore[method-assign]


def vote_state() -> None:
    """Bytes of the vote's running sums per voting parameter on MiniLM, with and without sums."""
    from gradfix.data import batched, label_set
    from gradfix.recipes import load_recipe

    sys.path.insert(0, str(Path(__file__).parent))
    from votes_speed import bbc_sentences, minilm_folder

    examples = bbc_sentences(16)
    model, recipe = load_recipe("text-zero-shot", minilm_folder(), label_set(examples))
    batches = [recipe.collate(chunk) for chunk in batched(examples, 8)]
    with vote_state_watch() as seen:
        _vote_state_rows(model, recipe, batches, examples, seen)


def _vote_state_rows(
    model: Any, recipe: Any, batches: list[Any], examples: list[Any], seen: list[int]
) -> None:
    from gradfix.votes import estimate_signs

    lora = ("attention.self.query.weight", "attention.self.value.weight")
    print(f"\nvote state on all-MiniLM-L6-v2, {len(examples)} BBC sentences, batches of 8")
    lean = 0.0
    for label, voting in (("every tensor", None), ("LoRA-like (query, value)", lora)):
        for param_name, p in model.named_parameters():
            p.requires_grad_(voting is None or param_name.endswith(voting))
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        for gradient in ("sum", "none"):
            start = time.perf_counter()
            votes = estimate_signs(model, batches, recipe.loss, progress=False, gradient=gradient)  # type: ignore[arg-type]
            wall = time.perf_counter() - start
            per_param = seen[-1] / params
            kept = sum(c.numel() * c.element_size() for c in votes.counts.values()) / params
            print(
                f"  {label}: {params / 1e6:.2f} M voting parameters, gradient={gradient!r}: "
                f"{per_param:.2f} bytes per voting parameter while voting, {kept:.2f} in the result "
                f"(counts {next(iter(votes.counts.values())).dtype}); vote {wall:.2f} s"
            )
            if gradient == "none" and voting is None:
                lean = per_param
    print(f"state_bytes_per_voting_param={lean:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gb", type=float, default=2.0, help="size of each synthetic checkpoint")
    parser.add_argument("--largest-mb", type=int, default=256, help="size of its largest tensor")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    args = parser.parse_args()
    if not args.skip_synthetic:
        synthetic(args.gb, args.largest_mb)
    if not args.skip_minilm:
        minilm()
        vote_state()
    skipped = "".join(f" --skip-{k}" for k in ("synthetic", "minilm") if getattr(args, f"skip_{k}"))
    print(
        "\ncommand: python benchmarks/transport_memory.py "
        f"--gb {args.gb} --largest-mb {args.largest_mb}{skipped}"
    )


if __name__ == "__main__":
    main()
