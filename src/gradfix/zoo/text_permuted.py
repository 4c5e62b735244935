"""The permuted release: a continued release of all-MiniLM-L6-v2 with its hidden units reordered.

B is ``text-release-short``'s B with, in every layer, its attention heads, the dimensions inside
each head and its FFN units permuted: the same function, coordinates that no longer line up with
A's. It is the cheapest real-scale stand-in for bases pre-trained independently (naive addition of
``τ_A`` should fail, re-basin should recover). B's fine-tunes are the short release's fine-tunes
permuted the same way, so they compute what those compute; data, A and A's fine-tunes are the
short release's own cache entries.

Which axes move together is defined once, by TransFusion's spec
(:func:`gradfix.methods.permutation_spec.spec_for_state_dict`); :func:`release_permutations` draws, per
layer, one head permutation ``σ`` shared by the query/key and value/output groups, a permutation
inside each head for each of those groups, and one of the FFN units, all from one seed. The
residual stream (embeddings, LayerNorms) is not permuted.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from gradfix.errors import ConfigError
from gradfix.io import load_state_dict
from gradfix.methods.permutation_spec import PermutationSpec, spec_for_state_dict
from gradfix.methods.transfusion import apply_permutations
from gradfix.recipes import HEAD_FILENAME
from gradfix.recipes._hf import tokenize
from gradfix.zoo.cache import Artifact, BuildFn
from gradfix.zoo.scenario import Scenario
from gradfix.zoo.text import load_encoder, quiet_hf, save_encoder
from gradfix.zoo.text_scenarios import TextConfig, text_scenario

PERMUTATION_SEED = 7
"""Seed of the permutations of the published scenario."""
OUTPUT_TOLERANCE = 1e-4
"""Largest difference of hidden states allowed between a model and its permuted copy (float32)."""
PROBE_TEXTS = (
    "Shares of the company rose after the quarterly report.",
    "The striker scored twice in the second half.",
    "Return the number of items in the container.",
    "A new album from the band is out next week.",
)
"""Texts on which a permuted model is checked against its source when it is built."""

_GROUP = re.compile(r"^layer\.(?P<i>\d+)\.(?P<kind>qk|vo|ffn)$")
PERMUTED_KINDS = ("qk", "vo", "ffn")
"""The groups of :func:`~gradfix.methods.permutation_spec.bert_spec` that are permuted, per layer."""


def release_permutations(
    spec: PermutationSpec, sizes: Mapping[str, int], seed: int, within_heads: bool = True
) -> dict[str, Tensor]:
    """Random permutations of every layer's heads, head dimensions and FFN units, from ``seed``.

    Per layer ``i`` (in order): a head permutation ``σ`` of the head set ``layer.{i}.heads``; for
    each of its groups (``qk``, ``vo``) a permutation ``ρ_j`` inside every head (identity unless
    ``within_heads``), ``p[j·d + r] = σ(j)·d + ρ_j(r)``; then ``p`` of ``layer.{i}.ffn``. Returns
    ``{group: p}`` in :func:`~gradfix.methods.transfusion.apply_permutations`'s convention; the
    residual group is left out (not permuted).
    """
    generator = torch.Generator().manual_seed(seed)
    layers = sorted({int(m.group("i")) for m in map(_GROUP.match, spec.groups) if m})
    if not layers:
        raise ConfigError("no attention or FFN groups in the spec: not a BERT-like encoder")
    perms: dict[str, Tensor] = {}
    for i in layers:
        head_set = spec.head_set_of(f"layer.{i}.qk")
        if head_set is None:
            raise ConfigError(f"layer {i}: its query/key group is not split into heads")
        heads = head_set.num_heads
        sigma = torch.randperm(heads, generator=generator)
        for group in head_set.groups:
            d = sizes[group] // heads
            inner = [_shuffled(d, generator) if within_heads else torch.arange(d) for _ in range(heads)]
            perms[group] = torch.cat([int(sigma[j]) * d + inner[j] for j in range(heads)])
        ffn = f"layer.{i}.ffn"
        perms[ffn] = torch.randperm(sizes[ffn], generator=generator)
    return perms


def _shuffled(n: int, generator: torch.Generator) -> Tensor:
    return torch.randperm(n, generator=generator)


def permutation_digest(perms: Mapping[str, Tensor]) -> str:
    """SHA-256 (16 hex digits) of the permutations, to check that two models were permuted alike."""
    digest = hashlib.sha256()
    for group in sorted(perms):
        digest.update(group.encode())
        digest.update(perms[group].to(torch.int64).numpy().tobytes())
    return digest.hexdigest()[:16]


def encoder_permutations(
    state: Mapping[str, Tensor], num_heads: int, seed: int, within_heads: bool = True
) -> tuple[PermutationSpec, dict[str, Tensor]]:
    """TransFusion's spec of a BERT-like state dict and :func:`release_permutations` for it."""
    spec = spec_for_state_dict(state, num_heads=num_heads)
    return spec, release_permutations(spec, spec.sizes(state), seed, within_heads)


@torch.no_grad()
def _hidden_states(model: torch.nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    return model(**batch).last_hidden_state


def permute_model(src: Path, out: Path, seed: int, within_heads: bool = True) -> dict[str, Any]:
    """Write ``src`` (a Hugging Face encoder folder) into ``out`` with its units permuted.

    The tokenizer and configuration files come from ``src``, and so does its zero-shot head when
    it has one (a fine-tune's head embeds class names with the unpermuted base: the same vectors).
    The permuted model is checked on :data:`PROBE_TEXTS`: its hidden states must equal the
    source's to :data:`OUTPUT_TOLERANCE`. Returns what to record (digest, units moved, the check).
    """
    with quiet_hf():
        model, tokenizer = load_encoder(src)
        batch = tokenize(tokenizer, list(PROBE_TEXTS), 32)
        before = _hidden_states(model, batch)
        state = {n: t.detach().clone() for n, t in model.state_dict().items()}
        heads = int(cast(Any, model).config.num_attention_heads)
        spec, perms = encoder_permutations(state, heads, seed, within_heads)
        model.load_state_dict(apply_permutations(state, perms, spec))
        difference = float((_hidden_states(model, batch) - before).abs().max())
        if difference > OUTPUT_TOLERANCE:
            raise ConfigError(f"{src}: permuted outputs differ by {difference:.2e}; not a symmetry")
        save_encoder(model, src, out)
    if (src / HEAD_FILENAME).is_file():
        shutil.copy2(src / HEAD_FILENAME, out / HEAD_FILENAME)
    moved = sum(int((p != torch.arange(len(p))).sum()) for p in perms.values())
    return {
        "permutation_sha256": permutation_digest(perms),
        "groups": len(perms),
        "units_moved": moved,
        "units": sum(len(p) for p in perms.values()),
        "max_output_difference": difference,
    }


def relative_drift(base_a: Path, base_b: Path, prefix: str = "encoder.") -> float:
    """``‖θ_B − θ_A‖ / ‖θ_A‖`` over the float tensors whose names start with ``prefix``."""
    a, b = load_state_dict(base_a), load_state_dict(base_b)
    names = [n for n in a if n.startswith(prefix) and a[n].is_floating_point()]
    diff = sum(float((b[n].double() - a[n].double()).pow(2).sum()) for n in names)
    norm = sum(float(a[n].double().pow(2).sum()) for n in names)
    return (diff / max(norm, 1e-30)) ** 0.5


def _build_permuted(seed: int, within_heads: bool) -> BuildFn:
    def build(out: Path, deps: Mapping[str, Path], progress: bool) -> dict[str, Any]:
        record = permute_model(deps["model"], out, seed, within_heads)
        if "A" in deps:
            record["drift_from_A"] = {
                "encoder": relative_drift(deps["A"], out),
                "encoder_before_permutation": relative_drift(deps["A"], deps["model"]),
            }
        return record

    return build


def permuted_scenario(
    name: str = "text-release-permuted",
    level: str = "short",
    config: TextConfig | None = None,
    seed: int = PERMUTATION_SEED,
    within_heads: bool = True,
) -> Scenario:
    """The scenario ``name``: the ``level`` release's A, data and A-ft; its B and B-ft permuted."""
    inner = text_scenario(f"text-release-{level}", level, config)
    recipe = {
        "method": (
            "per layer: a random permutation of the attention heads (query/key rows and value rows "
            "by head blocks, the attention output's input columns), of the dimensions inside each head "
            "(query/key and value/output separately), and of the FFN units (intermediate rows and "
            "bias, output columns); residual stream unchanged"
        ),
        "axes": "gradfix.methods.transfusion.bert_spec",
        "seed": seed,
        "within_heads": within_heads,
    }
    build = _build_permuted(seed, within_heads)
    release = inner.entries["B"]
    entries: dict[str, Artifact] = dict(inner.entries)
    entries["B"] = Artifact(
        f"{release.name}-permuted",
        "model",
        recipe,
        build,
        deps={"model": release, "A": inner.entries["A"]},
        summary=f"B: {release.name.split('/')[-1]} with heads and FFN units permuted",
    )
    for task in inner.tasks:
        finetune = inner.entries[f"B-ft/{task}"]
        entries[f"B-ft/{task}"] = Artifact(
            f"{release.name}-permuted-ft/{task}",
            "finetune",
            recipe,
            build,
            deps={"model": finetune},
            summary=f"B-ft/{task} permuted like B",
        )
    return Scenario(
        name=name,
        family="text",
        summary=(
            f"all-MiniLM-L6-v2 → its {level} release with every layer's heads and FFN units permuted "
            "(same function, coordinates not aligned with A's); BBC News tasks"
        ),
        entries=entries,
        tasks=inner.tasks,
        real=inner.real,
        built=(
            f"B = the {level} release (A after continued pre-training), its attention heads, head "
            f"dimensions and FFN units permuted in every layer (seed {seed}); B's fine-tunes permuted "
            "the same way; the task splits and A's fine-tunes are the release's own"
        ),
        extra={"level": f"{level}-permuted", "permutation_seed": seed},
    )
