"""A whole ``gradfix transport`` on a random Llama-architecture model: memory, vote state, vote time.

Built here, no download: a ``LlamaConfig`` model of the chosen size (``base``: about 0.5 B
parameters; ``small`` ~ 85 M, ``tiny`` ~ 1 M for a quick run) with random weights as A, and a word-level
tokenizer (``tokenizers`` WordLevel over generated words) saved beside it so that the
``causal-lm`` recipe loads the folder. A's fine-tune adds a LoRA-like update ``B·A`` of rank
``--rank`` to every attention and MLP projection (q, k, v, o, gate, up, down); the target B is A
plus small noise on every tensor. The three checkpoints (safetensors) and ``--samples`` JSON lines
``{"text": ...}`` of ``--tokens`` words go to a temporary folder (deleted afterwards unless
``--keep``).

Measured:

1. the transport (``gradfix transport --recipe causal-lm --method gradfix``, voting on the
   projections: ``--include '*_proj.weight'`` unless ``--all-tensors``) in a fresh process: its
   peak RSS (``VmHWM``) over the model's bytes, raw and after subtracting a process that only
   imports torch, transformers and gradfix; the RSS of each of its phases (scanning τ_A, loading
   B, the vote, the check, the descent report's backward, writing; ``rss_phases.py``); and, in
   another fresh process, the activations of one batched forward+backward of the vote's batch on
   B (its peak less its RSS with B loaded), so that the floor ``peak <= 1.5 x model bytes +
   activations`` reads ``(peak - imports - activations) / model bytes <= 1.5``;
2. in this process, on ``--device`` in ``--dtype``: B votes on the same samples with
   ``estimate_signs`` against one batched forward+backward of the same samples (same trainable
   tensors), in interleaved rounds (median of the per-round ratios); the vote state per voting
   parameter (bytes of the vote's running sums while voting, counts only as the transport keeps
   them) and which path counted the linear weights (C kernel, tiles, per-sample chunks).

It prints the device, every figure and the command, then machine-readable lines
``state_bytes_per_voting_param=<x>``, ``peak_over_model_bytes=<x>`` (peak less imports) and
``peak_less_activations_over_model_bytes=<x>`` (peak less imports and activations).

Run:  python benchmarks/llm_transport.py [--size base|small|tiny] [--samples 8] [--tokens 32]
      [--device auto|cpu|cuda] [--dtype float32|bfloat16|float16] [--rounds 3] [--threads N]
      [--signs votes|finetune]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rss_phases  # the transport's phases and the activations, each in a fresh process
import transport_memory  # the fresh-process measurement, shared

SIZES: dict[str, tuple[int, int, int, int, int]] = {  # hidden, MLP, layers, heads, vocabulary
    "tiny": (128, 352, 2, 4, 1000),
    "small": (768, 2048, 12, 12, 8000),
    "base": (1536, 4096, 16, 12, 32000),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPECIALS = ["[PAD]", "[UNK]", "<s>", "</s>"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_PEAK = (
    "def _peak_kb():\n"
    "    # VmHWM: this process's own high-water mark (ru_maxrss would include the parent's RSS at exec)\n"
    "    try:\n"
    "        for line in open('/proc/self/status'):\n"
    "            if line.startswith('VmHWM:'):\n"
    "                return int(line.split()[1])\n"
    "    except OSError:\n"
    "        pass\n"
    "    import resource\n"
    "    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
)
_BASELINE = (
    _PEAK + "import sys, torch, transformers, gradfix.cli.main, gradfix.jobs\n"
    "print('PEAK_RSS_KB', _peak_kb(), file=sys.stderr)\n"
)


# -- the models ---------------------------------------------------------------------------------
def word_tokenizer(vocab: int) -> tuple[Any, list[str]]:
    """A word-level fast tokenizer over ``vocab`` tokens (four specials and generated words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(vocab - len(SPECIALS))]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(SPECIALS)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )
    return tokenizer, words


def llama(size: str, seed: int) -> Any:
    """A random ``LlamaForCausalLM`` of the given size (float32, untied head, grouped KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, mlp, layers, heads, vocab = SIZES[size]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 3),
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def _save_like(source: Path, folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """``source``'s config and tokenizer files with other weights (one safetensors file)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    for f in source.iterdir():
        if not f.name.startswith("model.safetensors"):
            shutil.copy2(f, folder / f.name)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _scale(t: torch.Tensor) -> float:
    """A tensor's spread: its standard deviation, or its mean magnitude when constant (norms)."""
    return float(t.std()) if t.numel() > 1 and float(t.std()) > 0 else float(t.abs().mean()) or 1.0


def write_models(root: Path, size: str, rank: int, seed: int) -> tuple[dict[str, Path], list[str], int]:
    """A, A-ft (A + rank-``rank`` ``B·A`` on every projection) and B (A + noise) as HF folders.

    Returns the folders, the tokenizer's words and the model's parameter count.
    """
    model = llama(size, seed)
    tokenizer, words = word_tokenizer(SIZES[size][-1])
    paths = {"A": root / "A", "A-ft": root / "A-ft", "B": root / "B"}
    model.save_pretrained(paths["A"])
    tokenizer.save_pretrained(paths["A"])
    state = {n: t.detach() for n, t in model.state_dict().items()}
    numel = sum(t.numel() for t in state.values())
    gen = torch.Generator().manual_seed(seed + 1)
    tuned = dict(state)
    for name, w in state.items():
        if name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS:
            out_dim, in_dim = w.shape
            b = torch.randn(out_dim, rank, generator=gen) / rank**0.5
            a = torch.randn(rank, in_dim, generator=gen) * (0.2 * float(w.std()) / in_dim**0.5)
            tuned[name] = w + b @ a
    _save_like(paths["A"], paths["A-ft"], tuned)
    del tuned
    noisy = {n: t + 1e-3 * _scale(t) * torch.randn(t.shape, generator=gen) for n, t in state.items()}
    _save_like(paths["A"], paths["B"], noisy)
    return paths, words, numel


def write_data(path: Path, words: list[str], samples: int, tokens: int, seed: int) -> Path:
    """``samples`` JSON lines ``{"text": ...}`` of ``tokens`` random words each."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(words), (samples, tokens), generator=gen).tolist()
    path.write_text("".join(json.dumps({"text": " ".join(words[i] for i in row)}) + "\n" for row in ids))
    return path


# -- 1. the transport in a fresh process --------------------------------------------------------
def run_measured(code: str, args: list[str]) -> tuple[float, float]:
    """Run ``code`` in a fresh interpreter; return (peak RSS in bytes, wall seconds)."""
    peak_mb, wall = transport_memory.run_measured(code, args)
    return peak_mb * 1024 * 1024, wall


def transport_args(
    paths: dict[str, Path], data: Path, samples: int, out: Path, all_tensors: bool, signs: str = "votes"
) -> list[str]:
    """The ``gradfix transport`` command line of the benchmark (``signs="finetune"``: the adaptive
    choice from the shots on the signs of a fine-tune of B, ``--signs finetune``)."""
    args = ["transport", "--source-base", str(paths["A"]), "--source-finetuned", str(paths["A-ft"])]
    args += ["--target-base", str(paths["B"]), "--recipe", "causal-lm", "--data", str(data)]
    method = ["gradfix", "--alpha", "1"] if signs == "votes" else ["adaptive", "--signs", "finetune"]
    args += ["--shots", str(samples), "--method", *method, "--no-progress", "--json"]
    if not all_tensors:
        args += ["--include", "*_proj.weight"]
    return [*args, "--out", str(out)]


# -- 2. votes against the batched pass, in this process -----------------------------------------
class PathCounter:
    """Counts the calls of the linear vote paths while voting (C kernel, tiles) by wrapping them."""

    def __init__(self) -> None:
        from gradfix.votes import native, tiles

        self.calls: Counter[str] = Counter()
        self._saved = [(native, "add_linear_votes"), (tiles, "add_linear_votes")]
        self._originals = [getattr(m, n) for m, n in self._saved]

    def __enter__(self) -> PathCounter:
        labels = ("C kernel", "tiles")
        for (module, name), original, label in zip(self._saved, self._originals, labels, strict=True):
            setattr(module, name, self._counted(original, label))
        return self

    def _counted(self, original: Callable[..., Any], label: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            if result is not None:
                self.calls[label] += 1
            return result

        return wrapper

    def __exit__(self, *exc: object) -> None:
        for (module, name), original in zip(self._saved, self._originals, strict=True):
            setattr(module, name, original)

    def summary(self, linear_tensors: int, batches: int) -> str:
        kernel = sum(self.calls.values())
        rest = linear_tensors * batches - kernel
        parts = [f"{label} {n}" for label, n in sorted(self.calls.items())]
        if rest > 0:
            parts.append(f"per-sample chunks {rest}")
        return ", ".join(parts) + " (calls per linear weight and batch)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_votes(b_dir: Path, data: Path, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """B's votes on the samples against one batched forward+backward (same tensors trainable)."""
    from gradfix.data import UNLABELLED
    from gradfix.recipes import get_recipe, load_recipe
    from gradfix.votes import estimate_signs

    model, recipe = load_recipe("causal-lm", b_dir, [UNLABELLED])
    model.to(device=device, dtype=DTYPES[args.dtype])
    for name, p in model.named_parameters():
        p.requires_grad_(args.all_tensors or name.endswith("_proj.weight"))
    examples = get_recipe("causal-lm").read_examples(data)
    size = args.batch_size
    batches = [recipe.collate(examples[i : i + size]) for i in range(0, len(examples), size)]
    voting = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def batched() -> float:
        start = time.perf_counter()
        for batch in batches:
            recipe.loss(model, batch).sum().backward()
        _sync(device)
        seconds = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        return seconds

    def votes() -> tuple[float, Any]:
        start = time.perf_counter()
        # what `gradfix transport` keeps for a gradfix mask: the counts only
        result = estimate_signs(
            model, batches, recipe.loss, engine=args.engine, progress=False, gradient="none"
        )
        _sync(device)
        return time.perf_counter() - start, result

    batched()  # warm-up (allocator, kernels, the C kernel's build)
    with PathCounter() as paths, transport_memory.vote_state_watch() as seen:
        _, result = votes()
    rounds = []
    for _ in range(args.rounds):
        rounds.append((batched(), votes()[0]))
    state = seen[-1]  # the running sums while voting (int8 counters below 128 samples), at its end
    held = [*result.counts.values(), *result.grad_sum.values()]
    returned = sum(t.numel() * t.element_size() for t in held)
    params = sum(p.numel() for p in voting.values())
    linear = sum(1 for n in voting if n.endswith("_proj.weight"))
    return {
        "batched": statistics.median(r[0] for r in rounds),
        "votes": statistics.median(r[1] for r in rounds),
        "ratio": statistics.median(r[1] / r[0] for r in rounds),
        "state_bytes": state,
        "returned_bytes": returned,
        "voting_params": params,
        "count_dtype": str(next(iter(result.counts.values())).dtype) if result.counts else "none",
        "paths": paths.summary(linear, len(batches)),
        "samples": len(examples),
    }


def choose_device(name: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32, help="words per sample (a token each, and <s>)")
    parser.add_argument("--batch-size", type=int, default=8, help="part 2's batches (the CLI's default)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default="auto", help="part 2: auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="part 2: B's dtype")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--all-tensors", action="store_true", help="vote on every tensor, not projections")
    parser.add_argument("--force-tiles", action="store_true", help="GRADFIX_TILES=1 (tiles on the CPU)")
    parser.add_argument("--skip-transport", action="store_true", help="only part 2")
    parser.add_argument(
        "--signs",
        choices=["votes", "finetune"],
        default="votes",
        help="part 1's signs: B's votes (GradFix, α = 1), or a fine-tune of B (the adaptive choice, "
        "--signs finetune: one fine-tune per fold and one on every shot)",
    )
    parser.add_argument("--keep", type=Path, default=None, help="write the models here and keep them")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.force_tiles:
        os.environ["GRADFIX_TILES"] = "1"  # this process and the transport's
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    device = choose_device(args.device)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    root = args.keep or Path(tempfile.mkdtemp(prefix="gradfix-llm-"))
    try:
        report(args, device, command, root)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


def report(args: argparse.Namespace, device: torch.device, command: str, root: Path) -> None:
    """Build the models and data under ``root``, measure, print."""
    started = time.perf_counter()
    paths, words, numel = write_models(root, args.size, args.rank, args.seed)
    data = write_data(root / "data.jsonl", words, args.samples, args.tokens, args.seed)
    model_bytes = numel * 4
    threads = torch.get_num_threads()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} threads"
    print(f"command: {command}")
    print(f"device (part 2): {device} ({name}); transport: CPU, {threads} threads")
    print(f"model: Llama {args.size}, {numel / 1e6:.1f} M parameters, {model_bytes / 2**30:.2f} GiB fp32")
    print(f"data: {args.samples} samples of {args.tokens} words; LoRA-like rank {args.rank} on")
    print(f"      {', '.join(PROJECTIONS)}; built in {time.perf_counter() - started:.1f} s")
    peak_over = less_act = float("nan")
    if not args.skip_transport:
        peak_over, less_act = transport_part(args, paths, data, root, model_bytes)
    timing = time_votes(paths["B"], data, args, device)
    n, per_param = timing["samples"], timing["state_bytes"] / max(1, timing["voting_params"])
    print(f"\n2. votes on {device} in {args.dtype}, {n} samples, {args.rounds} rounds (median)")
    print(f"   voting parameters {timing['voting_params'] / 1e6:.1f} M")
    print(f"   linear weights counted by: {timing['paths']}")
    for label, key in (("batched forward+backward", "batched"), ("votes (estimate_signs)  ", "votes")):
        print(f"   {label} {timing[key]:.3f} s ({timing[key] / n:.4f} s/sample)")
    print(f"   votes over batched pass  {timing['ratio']:.2f}")
    state_mib = timing["state_bytes"] / 2**20
    print(f"   vote state while voting (counts only, as the transport keeps): {state_mib:.1f} MiB")
    print(f"   = {per_param:.2f} bytes per voting parameter; floor: <= 2 bytes")
    returned = timing["returned_bytes"] / max(1, timing["voting_params"])
    print(f"   returned: {returned:.2f} bytes per voting parameter (counts {timing['count_dtype']})")
    print(f"votes_over_batched_backward={timing['ratio']:.3f}")
    print(f"state_bytes_per_voting_param={per_param:.3f}")
    print(f"peak_over_model_bytes={peak_over:.3f}")
    print(f"peak_less_activations_over_model_bytes={less_act:.3f}")


def transport_part(
    args: argparse.Namespace, paths: dict[str, Path], data: Path, root: Path, model_bytes: int
) -> tuple[float, float]:
    """Run and print part 1; return the peak RSS less the imports' RSS over the model's bytes,
    and the same less the activations of one batched forward+backward of the vote's batch."""
    from gradfix.settings import VoteSettings

    out = root / "out"
    cli = transport_args(paths, data, args.samples, out, args.all_tensors, args.signs)
    base_rss, _ = run_measured(_BASELINE, [])
    measured = rss_phases.run(["command", *cli])
    record = json.loads((out / "gradfix.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    batch = min(args.samples, VoteSettings().batch_size)  # the transport votes in the CLI's batches
    acts = rss_phases.activations(paths["B"], data, batch, args.all_tensors)
    peak = measured.peak
    over = (peak - base_rss) / model_bytes
    less = (peak - base_rss - acts) / model_bytes
    print("\n1. gradfix transport (fresh process):")
    print("   gradfix " + " ".join(shlex.quote(a) for a in cli))
    print(f"   wall {measured.wall:.1f} s, {record['data']['num_samples']} samples, signs: {args.signs}")
    print(f"   RSS by phase (over model bytes; imports alone {base_rss / model_bytes:.2f}):")
    for line in rss_phases.phase_lines(measured.phases, model_bytes):
        print("     " + line)
    print(f"   peak RSS {peak / 2**30:.2f} GiB = {peak / model_bytes:.2f} x model bytes")
    print(f"   imports alone {base_rss / 2**30:.2f} GiB; peak less imports {over:.2f} x model bytes")
    print(
        f"   activations of one batched forward+backward of the vote's batch ({batch} samples, fresh "
        f"process, its peak less B loaded): {acts / 2**30:.2f} GiB = {acts / model_bytes:.2f} x model bytes"
    )
    print(f"   peak less imports and activations {less:.2f} x model bytes; floor: <= 1.5")
    return over, less


if __name__ == "__main__":
    main()
