"""Sign votes on a GPU against one batched forward+backward, in bfloat16 and in float32.

Builds a random Llama-architecture language model from a config (no download; by default about
0.2 B parameters: 12 layers of width 1024, MLP 2816, vocabulary 32 000), moves it to CUDA and
times, per dtype, in interleaved rounds:

- ``batched``: one forward and backward of the summed next-token loss over the batch (the floor);
- ``votes``: gradfix's per-sample sign votes on the same batch (``estimate_signs``, hooks
  engine, counts only as ``gradfix transport`` takes them); on a GPU, and in bfloat16 anywhere,
  every linear weight votes through the tiled batched products of :mod:`gradfix.votes.tiles`
  (bfloat16 products accumulated in float32).

A ratio is the median over rounds of ``votes / batched`` within the round. The last lines are
``votes_over_batched_backward_bfloat16=<x>``, ``votes_over_batched_backward_float32=<x>`` and
``votes_over_batched_backward=<x>`` (the bfloat16 one: models are shipped in it; the floor on a
GPU is 1.3).

Without a CUDA device it says so and exits (status 0); ``--allow-cpu`` runs the same measurement
on the CPU (with ``--tiny``: a model of a few hundred thousand parameters, to check the script).
Run:  bash benchmarks/gpu_votes.sh [--repeat 5] [--samples 16] [--tokens 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import gradfix  # noqa: F401  # isort: skip  (before torch, as the gradfix command: OpenMP wait policy)
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradfix import estimate_signs

NO_GPU = "no CUDA GPU present"


def build_model(tiny: bool, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A random Llama language model (every weight trainable except the embeddings), in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    size = (
        {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "vocab_size": 512}
        if tiny
        else {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12, "vocab_size": 32000}
    )
    heads = max(1, size["hidden_size"] // 64)
    config = LlamaConfig(
        **size, num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    for name, param in model.named_parameters():
        param.requires_grad_("embed_tokens" not in name)
    return model


def lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Per-sample mean next-token cross-entropy (float32), shape ``[B]``."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids).logits[:, :-1].float()
    losses = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return losses.mean(dim=1)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(dtype: torch.dtype, args: argparse.Namespace, device: torch.device) -> float:
    """Median over rounds of votes / batched for a model in ``dtype``; prints the seconds."""
    model = build_model(args.tiny, dtype, device)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, vocab, (args.samples, args.tokens), generator=gen).to(device)}

    def batched() -> None:
        lm_loss(model, batch).sum().backward()
        model.zero_grad(set_to_none=True)

    def votes() -> None:
        estimate_signs(model, [batch], lm_loss, engine="hooks", progress=False, gradient="none")

    batched(), votes()  # warm-up (kernels, allocator)
    times: dict[str, list[float]] = {"batched": [], "votes": []}
    for r in range(args.repeat):
        for name in ("batched", "votes") if r % 2 == 0 else ("votes", "batched"):
            times[name].append(timed(batched if name == "batched" else votes, device))
    ratio = statistics.median(v / b for v, b in zip(times["votes"], times["batched"], strict=True))
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    name = str(dtype).removeprefix("torch.")
    print(
        f"{name:<9} {params / 1e6:>8.1f} M voting  batched {statistics.median(times['batched']):.4f} s  "
        f"votes {statistics.median(times['votes']):.4f} s  votes/batched {ratio:.2f}"
    )
    return ratio


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--samples", type=int, default=16, help="samples per batch")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per sample")
    parser.add_argument("--allow-cpu", action="store_true", help="measure on the CPU when there is no GPU")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (to check the script)")
    args = parser.parse_args(argv)
    print(
        "command: "
        + " ".join(["bash benchmarks/gpu_votes.sh", *(argv if argv is not None else sys.argv[1:])])
    )
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        print(f"device: {device} ({torch.cuda.get_device_name(device)}), torch {torch.__version__}")
    elif args.allow_cpu:
        device = torch.device("cpu")
        threads = torch.get_num_threads()
        print(f"device: cpu ({NO_GPU}; --allow-cpu), torch {torch.__version__}, {threads} threads")
    else:
        print(f"{NO_GPU} (torch {torch.__version__}, CUDA {torch.version.cuda}): nothing measured;")
        print("run this on a machine with a GPU, or pass --allow-cpu to time the same votes on the CPU")
        return 0
    print(f"batch: {args.samples} samples x {args.tokens} tokens, {args.repeat} rounds")
    ratios = {}
    for dtype in (torch.bfloat16, torch.float32):
        ratios[dtype] = measure(dtype, args, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the last dtype's model is gone
    print(f"votes_over_batched_backward_bfloat16={ratios[torch.bfloat16]:.2f}")
    print(f"votes_over_batched_backward_float32={ratios[torch.float32]:.2f}")
    print(f"votes_over_batched_backward={ratios[torch.bfloat16]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
