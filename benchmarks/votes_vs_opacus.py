"""Sign votes with Opacus's per-sample gradients against gradfix's engine, on the real MiniLM.

Same setting as ``votes_speed.py`` (32 BBC sentences, 48 tokens, word embeddings frozen, 2
threads). Opacus (``GradSampleModule``) materialises every parameter's per-sample gradients
(``p.grad_sample``, ``B × P`` values) in one batched backward; the votes are then the sums of
their signs. Opacus captures activations only in training mode, so its copy of the model runs in
training mode with dropout set to 0 (the same arithmetic as eval mode). Each side has its own copy
of the model (Opacus's hooks stay on the modules it wraps). Interleaved rounds; ratios are medians
of per-round ratios to one batched forward+backward.

Needs Opacus: ``pip install --no-deps opacus opt_einsum`` (``--no-deps`` keeps the installed torch).
Run:  python benchmarks/votes_vs_opacus.py [--repeat 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch
from torch import nn
from votes_speed import LABELS, bbc_sentences, minilm_folder, ratio, rounds

from gradfix import estimate_signs
from gradfix.recipes import load_recipe


def frozen_like_the_benchmark(model: nn.Module) -> list[torch.Tensor]:
    """Word embeddings and pooler frozen; the trainable parameters."""
    model.embeddings.word_embeddings.weight.requires_grad_(False)
    for p in model.pooler.parameters():
        p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    try:
        from opacus import GradSampleModule
    except ModuleNotFoundError as exc:
        raise SystemExit("needs Opacus: pip install --no-deps opacus opt_einsum") from exc
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="opacus")
    model, recipe = load_recipe("text-zero-shot", minilm_folder(), LABELS, max_length=48)
    other, _ = load_recipe("text-zero-shot", minilm_folder(), LABELS, max_length=48)
    trainable = frozen_like_the_benchmark(model)
    other_trainable = frozen_like_the_benchmark(other)
    model.eval()
    for m in other.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    wrapped = GradSampleModule(other, batch_first=True, loss_reduction="sum").train()
    batch = recipe.collate(bbc_sentences(32))

    def batched() -> None:
        torch.autograd.grad(recipe.loss(model, batch).sum(), trainable)

    def gradfix_votes() -> None:
        estimate_signs(model, [batch], recipe.loss, engine="hooks", progress=False)

    def opacus_votes() -> None:
        recipe.loss(wrapped, batch).sum().backward()
        for p in other_trainable:
            grads = p.grad_sample
            -torch.sign(grads).sum(dim=0)
            grads.sum(dim=0)
            p.grad_sample = p.grad = None

    times = rounds({"batched": batched, "gradfix hooks": gradfix_votes, "opacus": opacus_votes}, args.repeat)
    print(f"\n{'method':<14} {'median s':>9} {'x batched':>10}")
    for name, values in times.items():
        print(f"{name:<14} {statistics.median(values):>9.3f} {ratio(times, name):>10.2f}")
    print(f"\ncommand: python benchmarks/votes_vs_opacus.py --repeat {args.repeat} --threads {args.threads}")


if __name__ == "__main__":
    main()
