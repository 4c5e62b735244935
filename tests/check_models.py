"""Tiny BERTs for the check's tests: a task-like fine-tune and a permuted copy (the same function)."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import load_saved_model, topic_examples

from gradfix.methods.transfusion import apply_permutations, bert_spec
from gradfix.recipes import load_recipe


def save_like(model: torch.nn.Module, src: Path, out: Path) -> Path:
    """Save ``model`` to ``out`` with ``src``'s tokenizer."""
    from transformers import AutoTokenizer

    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src, local_files_only=True).save_pretrained(out)
    return out


def finetune(base: Path, out: Path, steps: int = 10, lr: float = 0.05) -> Path:
    """``base`` after ``steps`` full-batch gradient steps on the topic task (a task-like ``τ_A``)."""
    examples = topic_examples(16, seed=7)
    model, recipe = load_recipe("text-zero-shot", base, sorted({e.label for e in examples}))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    batch = recipe.collate(examples)
    for _ in range(steps):
        recipe.loss(model, batch).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return save_like(model, base, out)


def permuted(src: Path, out: Path, seed: int) -> Path:
    """``src`` (a 2-layer tiny BERT) with its residual stream and FFN units permuted at random."""
    model = load_saved_model(src)
    state = model.state_dict()
    spec = bert_spec(num_layers=2, num_heads=2)
    generator = torch.Generator().manual_seed(seed)
    perms = {"residual": torch.randperm(32, generator=generator)}
    perms |= {f"layer.{i}.ffn": torch.randperm(64, generator=generator) for i in range(2)}
    covered = {n: t for n, t in state.items() if n in set(spec.tensor_names())}
    model.load_state_dict({**state, **apply_permutations(covered, perms, spec)})
    return save_like(model, src, out)
