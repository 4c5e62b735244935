"""Shared parts of the checkpoint-to-checkpoint jobs: settings, input records, voting, writing.

Each job reads checkpoints tensor by tensor, votes on the target with a recipe, and writes a
complete output folder (weights, the target's config and tokenizer files, ``gradfix.json``) into a
temporary folder that is moved into place only when everything was written.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradfix.data import batched, label_set, load_examples, sample_shots
from gradfix.errors import ConfigError, GradfixError
from gradfix.io import (
    ShardedWriter,
    copy_model_files,
    open_checkpoint,
    sha256_file,
)
from gradfix.recipes import load_recipe
from gradfix.task_vector import apply_tensor
from gradfix.votes import SignVotes, estimate_signs

DEFAULT_SHARD_BYTES = 2 * 2**30
HEAD_FILE = "zero_shot_head.safetensors"


@dataclass
class VoteSettings:
    """How the target votes: recipe, data, shots and estimator."""

    recipe: str = "text-zero-shot"
    data: str | None = None
    shots: int = 2
    seed: int = 0
    estimator: str = "majority"
    engine: str = "auto"
    template: str | None = None
    batch_size: int = 8
    max_length: int = 128
    progress: bool = True


@dataclass
class MaskSettings:
    """How ``τ_A`` is masked and scaled."""

    mask: str = "agreement"
    alpha: float = 1.0
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    unvoted: str = "error"
    gamma: float = 1.0


def input_record(path: str | Path) -> dict[str, Any]:
    """``{"path", "sha256": {file: digest}}`` of a checkpoint or data file, for ``gradfix.json``."""
    path = Path(path)
    if path.is_file():
        return {"path": str(path), "sha256": {path.name: sha256_file(path)}}
    with open_checkpoint(path) as reader:
        files = list(reader.files)
    return {"path": str(path), "sha256": {str(f.relative_to(path)): sha256_file(f) for f in files}}


def align_names(model_names: Sequence[str], checkpoint_names: Sequence[str]) -> dict[str, str]:
    """Map a loaded model's parameter names to the checkpoint's names.

    Handles checkpoints saved with or without the model's base prefix (``bert.`` ...): returns
    ``{model name: checkpoint name}`` for every model name that has a match.
    """
    ckpt = set(checkpoint_names)
    if all(n in ckpt for n in model_names):
        return {n: n for n in model_names}
    best: dict[str, str] = {}
    prefixes = {
        c[: len(c) - len(m)] for m in model_names[:50] for c in checkpoint_names if c.endswith("." + m)
    }
    prefixes |= {
        m[: len(m) - len(c)] for m in model_names[:50] for c in checkpoint_names if m.endswith("." + c)
    }
    for prefix in sorted(prefixes | {""}, key=len):
        mapping = {}
        for n in model_names:
            if prefix + n in ckpt:
                mapping[n] = prefix + n
            elif n.startswith(prefix) and n[len(prefix) :] in ckpt:
                mapping[n] = n[len(prefix) :]
        if len(mapping) > len(best):
            best = mapping
    return best


def _rename_votes(votes: SignVotes, mapping: Mapping[str, str]) -> SignVotes:
    return SignVotes(
        counts={mapping[n]: c for n, c in votes.counts.items() if n in mapping},
        grad_sum={mapping[n]: g for n, g in votes.grad_sum.items() if n in mapping},
        num_samples=votes.num_samples,
        estimator=votes.estimator,
        hits={mapping[n]: h for n, h in votes.hits.items() if n in mapping},
    )


def vote_on_target(
    target: str | Path, settings: VoteSettings, checkpoint_names: Sequence[str], voted: Sequence[str]
) -> tuple[SignVotes, nn.Module, Any, dict[str, Any]]:
    """Load the target with its recipe, draw ``shots`` examples per class and vote.

    Only the parameters whose checkpoint name is in ``voted`` take part (the rest are frozen),
    and the returned votes are keyed by checkpoint names.
    """
    if not settings.data:
        raise ConfigError("voting needs a labelled data file (--data)")
    examples = load_examples(settings.data)
    labels = label_set(examples)
    shots = sample_shots(examples, settings.shots, settings.seed, labels)
    model, recipe = load_recipe(
        settings.recipe, target, labels, template=settings.template, max_length=settings.max_length
    )
    mapping = align_names([n for n, _ in model.named_parameters()], checkpoint_names)
    wanted = set(voted)
    for name, param in model.named_parameters():
        param.requires_grad_(mapping.get(name) in wanted)
    batches = [recipe.collate(chunk) for chunk in batched(shots, settings.batch_size)]
    votes = estimate_signs(
        model, batches, recipe.loss, settings.estimator, engine=settings.engine, progress=settings.progress
    )
    info = {"labels": labels, "num_examples": len(examples), "num_samples": votes.num_samples}
    return _rename_votes(votes, mapping), model, recipe, info


def write_model(
    out: Path,
    target: str | Path,
    update: Mapping[str, Tensor],
    alpha: float,
    shard_bytes: int,
    record: dict[str, Any],
    recipe: Any = None,
) -> list[str]:
    """Write ``θ_target + α · update`` tensor by tensor, the target's other files, and the record."""
    with open_checkpoint(target) as reader:
        writer = ShardedWriter(out, max_shard_bytes=shard_bytes, metadata={"gradfix": "transported"})
        for name in reader.names():
            tensor = reader.get(name)
            writer.add(name, apply_tensor(tensor, update[name], alpha) if name in update else tensor)
        files = [p.name for p in writer.close()]
    copy_model_files(target, out)
    if recipe is not None and hasattr(recipe, "save_head"):
        recipe.save_head(out / HEAD_FILE)
        files.append(HEAD_FILE)
    (out / "gradfix.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return files


def base_record(command: str) -> dict[str, Any]:
    from gradfix import __version__

    return {
        "command": command,
        "gradfix_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }


def check_finite(tensors: Mapping[str, Tensor], label: str) -> None:
    """Raise naming the first tensors that hold NaN or Inf."""
    bad = [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise GradfixError(f"{label}: non-finite values (NaN or Inf) in {', '.join(bad[:10])}")
