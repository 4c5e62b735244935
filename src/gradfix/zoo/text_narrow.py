"""The narrow release: an encoder of another width distilled from all-MiniLM-L6-v2 on unlabelled text.

B is a BERT of A's depth and head size but fewer units everywhere (:data:`NARROW`: hidden 256, 8
heads of 32, FFN 1024; A has 384, 12 heads of 32, 1536), word, position and token-type embeddings
included, so ``τ_A`` cannot be added to it as it is: the cross-width text pair for Theseus.

How B is made (:func:`narrow_init`, then :func:`distill`), all on Python's docstrings:

1. **Initialisation by activation variance.** A runs on the first :data:`VARIANCE_TEXTS`
   docstring paragraphs; every space of TransFusion's BERT spec (the residual stream, each
   layer's FFN units, its query/key and value/output head spaces, the pooler) gets the variance of
   each of its units, pooled over every place the space is observed (each site centred by its own
   mean; :func:`unit_variances`). B keeps, per space, the units of largest variance: the residual
   stream's 256 of 384 dimensions (the few outlier dimensions of the stream survive), each
   layer's 1024 of 1536 FFN units, the pooler's 256 units, and each layer's 8 of 12 heads whose
   query, key and value dimensions have the largest summed variance (whole heads, so the head
   size and the attention's scaling stay A's). Kept units stay in A's order; ties go to the lower
   index. A plain prefix would keep units by position, which in a trained network says nothing
   about what they carry. B's weights are A's restricted to the kept units
   (``W_B = T_outᵀ W_A T_in`` with 0/1 selection maps, :func:`~gradfix.methods.theseus.apply_transforms`).
2. **Distillation.** B is trained to reproduce A's mean-pooled sentence embeddings through a
   fixed linear projection ``P`` (``384 × 256``): the residual stream's selection map, so the
   target of a text is A's normalised embedding restricted to the kept dimensions (about 90 % of
   its energy on the docstrings) and B starts close to it. The loss is ``1 − cos(e_B, Pᵀ e_A)``
   (the zero-shot head reads cosines); every parameter but the word embeddings and the pooler is
   trained (as for the other releases), with dropout.

The data, A and A's fine-tunes are ``text-release-short``'s own cache entries; B's fine-tunes are
B fine-tuned on each task like every other B (the upper bound).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradfix.data import batched
from gradfix.errors import ConfigError
from gradfix.methods.activations import Site
from gradfix.methods.permutation_spec import PermutationSpec, spec_for_module
from gradfix.methods.theseus import apply_transforms, spec_sites
from gradfix.recipes import mean_pool
from gradfix.recipes._hf import tokenize
from gradfix.zoo import docstrings
from gradfix.zoo.cache import Artifact, BuildFn
from gradfix.zoo.scenario import Scenario
from gradfix.zoo.text import load_encoder, quiet_hf, relative_change, save_encoder
from gradfix.zoo.text_scenarios import TextConfig, _build_finetune, _python_minor, text_scenario
from gradfix.zoo.training import TrainSettings, seeded_batches, train

POOLING_CONFIG = Path("1_Pooling") / "config.json"


@dataclass(frozen=True)
class NarrowShape:
    """B's widths: residual stream, attention heads (A's head size), FFN units."""

    hidden: int = 256
    heads: int = 8
    intermediate: int = 1024

    def to_dict(self) -> dict[str, int]:
        """The shape as a plain dict."""
        return asdict(self)


NARROW = NarrowShape()
VARIANCE_TEXTS = 256
"""Docstring paragraphs on which A's unit variances are measured (the first ones of the corpus)."""
MAX_LENGTH = 32
"""Tokens per docstring paragraph for the variances and the distillation."""
DISTILL = TrainSettings(steps=50, lr=2e-4, batch_size=32, weight_decay=0.01, seed=3)
"""The published distillation (steps, learning rate, batch, seed)."""


@torch.no_grad()
def unit_variances(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int = MAX_LENGTH, batch_size: int = 64
) -> dict[str, Tensor]:
    """``{space: variance of each unit}`` of a BERT-like encoder on ``texts`` (padding left out).

    Spaces are those of :func:`~gradfix.methods.permutation_spec.spec_for_module`, observed at the sites
    Theseus records (:func:`~gradfix.methods.theseus.spec_sites`). A unit's variance is the mean
    of its per-site variances (each site centred by its own mean), weighted by tokens.
    """
    spec = spec_for_module(model)
    sites = spec_sites(model, spec)
    moments: dict[Site, list[Tensor]] = {}
    mask: list[Tensor] = []

    def hook(site: Site) -> Any:
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            value = (args[0] if site.kind == "input" else output).detach().double()
            tokens = value.dim() == 3 and value.shape[:2] == mask[0].shape
            rows = value[mask[0]] if tokens else value.reshape(-1, value.shape[-1])  # [rows, width]
            width = rows.shape[-1]
            sums = moments.setdefault(site, [torch.zeros(s, dtype=torch.float64) for s in ((), width, width)])
            sums[0] += rows.shape[0]
            sums[1] += rows.sum(0)
            sums[2] += rows.pow(2).sum(0)

        return record

    every = list(dict.fromkeys(site for group in sites.values() for site in group))
    handles = [model.get_submodule(site.module).register_forward_hook(hook(site)) for site in every]
    model.eval()
    try:
        for chunk in batched(list(texts), batch_size):
            batch = tokenize(tokenizer, list(chunk), max_length)
            mask[:] = [batch["attention_mask"].bool()]
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    out: dict[str, Tensor] = {}
    for space, group in sites.items():
        count = sum(float(moments[s][0]) for s in group)
        centred = [moments[s][2] - moments[s][1].pow(2) / moments[s][0] for s in group]
        out[space] = torch.stack(centred).sum(0) / count
    return out


def top_units(scores: Tensor, keep: int) -> Tensor:
    """Indices of the ``keep`` largest scores, in increasing index order (ties: the lower index)."""
    if not 0 < keep <= len(scores):
        raise ConfigError(f"cannot keep {keep} of {len(scores)} units")
    order = torch.sort(-scores.double(), stable=True).indices
    return order[:keep].sort().values


def selection_map(kept: Tensor, width: int) -> Tensor:
    """``T [width, len(kept)]`` with ``T[kept[j], j] = 1``: keeps those units, in that order."""
    t = torch.zeros(width, len(kept), dtype=torch.float64)
    t[kept, torch.arange(len(kept))] = 1.0
    return t


def _keep_count(space: str, shape: NarrowShape) -> int:
    return shape.intermediate if space.endswith(".ffn") else shape.hidden


def selection_maps(
    variances: Mapping[str, Tensor], spec: PermutationSpec, shape: NarrowShape
) -> dict[str, Tensor]:
    """One 0/1 map per space: the units of largest variance, whole heads for head-split spaces.

    A head's score is the summed variance of its query/key and value/output dimensions; the
    ``shape.heads`` best heads are kept with all their dimensions, in both head spaces alike.
    """
    maps: dict[str, Tensor] = {}
    done: set[str] = set()
    for space, variance in variances.items():
        head_set = spec.head_set_of(space)
        if head_set is None:
            maps[space] = selection_map(top_units(variance, _keep_count(space, shape)), len(variance))
            continue
        if space in done:
            continue
        groups = [g for g in head_set.groups if g in variances]
        score = sum(variances[g].double().reshape(head_set.num_heads, -1).sum(1) for g in groups)
        heads = top_units(cast(Tensor, score), shape.heads)
        for group in groups:
            size = len(variances[group]) // head_set.num_heads
            kept = torch.cat([torch.arange(h * size, (h + 1) * size) for h in heads.tolist()])
            maps[group] = selection_map(kept, len(variances[group]))
        done.update(groups)
    return maps


def narrow_init(
    model_a: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    shape: NarrowShape = NARROW,
    max_length: int = MAX_LENGTH,
) -> tuple[nn.Module, dict[str, Any], Tensor]:
    """B of ``shape`` holding A's weights restricted to A's units of largest variance on ``texts``.

    Returns B (same class and configuration as A but the widths), what to record (the kept heads
    per layer, the share of each space's variance the kept units hold) and the residual stream's
    selection map ``[d_A, d_B]`` (the distillation's projection).
    """
    config = copy.deepcopy(cast(Any, model_a).config)
    head_size = config.hidden_size // config.num_attention_heads
    if shape.hidden != shape.heads * head_size:
        raise ConfigError(f"hidden {shape.hidden} is not {shape.heads} heads of A's head size {head_size}")
    spec = spec_for_module(model_a)
    variances = unit_variances(model_a, tokenizer, texts, max_length)
    maps = selection_maps(variances, spec, shape)
    state = {n: t for n, t in model_a.state_dict().items() if t.is_floating_point()}
    narrowed = apply_transforms(state, maps, spec)
    config.hidden_size, config.num_attention_heads = shape.hidden, shape.heads
    config.intermediate_size = shape.intermediate
    model_b = type(model_a)(config)
    model_b.load_state_dict({n: t.contiguous() for n, t in narrowed.items()}, strict=False)
    missing = [n for n, t in model_b.state_dict().items() if t.is_floating_point() and n not in narrowed]
    if missing:
        raise ConfigError(f"narrowed model lacks {missing[:4]}: A's spec does not cover them")
    kept_share = {
        g: round(float((variances[g] @ maps[g]).sum() / variances[g].sum()), 4) for g in sorted(maps)
    }
    heads = {
        g.split(".qk")[0]: [int(i) // head_size for i in maps[g].nonzero()[:, 0][::head_size].tolist()]
        for g in maps
        if g.endswith(".qk")
    }
    record = {"kept_heads": heads, "kept_variance_share": kept_share}
    return model_b.eval(), record, maps["residual"].float()


def _embed_raw(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    return mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])


@torch.no_grad()
def teacher_embeddings(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int = MAX_LENGTH
) -> Tensor:
    """A's L2-normalised mean-pooled embeddings ``[N, d_A]`` of ``texts`` (eval mode, in order)."""
    model.eval()
    rows = [
        F.normalize(_embed_raw(model, tokenize(tokenizer, list(chunk), max_length)), dim=-1)
        for chunk in batched(list(texts), 64)
    ]
    return torch.cat(rows)


def distillation_loss(student: Tensor, target: Tensor) -> Tensor:
    """``1 − cos(e_B, Pᵀ e_A)`` per text, averaged."""
    return (1.0 - F.cosine_similarity(student, target, dim=-1)).mean()


def distillation_targets(
    model_a: nn.Module, tokenizer: Any, texts: Sequence[str], projection: Tensor, max_length: int = MAX_LENGTH
) -> tuple[Tensor, float]:
    """``Pᵀ e_A`` for each text ``[N, d_B]`` (:func:`teacher_embeddings`) and the share of the
    embeddings' energy ``P`` keeps."""
    with quiet_hf():
        embeddings = teacher_embeddings(model_a, tokenizer, texts, max_length)
    targets = embeddings @ projection
    return targets, float(targets.pow(2).sum() / embeddings.pow(2).sum())


def distill(
    model_b: nn.Module,
    model_a: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    settings: TrainSettings,
    projection: Tensor,
    max_length: int = MAX_LENGTH,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``model_b`` to reproduce ``model_a``'s embeddings of ``texts`` through a fixed ``P``
    (``projection``, ``[d_A, d_B]``).

    The texts a run draws (seeded batches) are embedded by A once (:func:`distillation_targets`).
    Word embeddings and pooler stay frozen. Returns the training record with the loss on the
    first batch before training (eval mode), ``P``'s energy share and B's relative change.
    """
    draws = seeded_batches(list(range(len(texts))), settings.batch_size, settings.seed)
    plan = [next(draws) for _ in range(settings.steps)]
    used = sorted({i for chunk in plan for i in chunk})
    chosen = [texts[i] for i in used]
    projected, energy = distillation_targets(model_a, tokenizer, chosen, projection, max_length)
    targets = dict(zip(used, projected, strict=True))
    params = []
    for name, param in model_b.named_parameters():
        param.requires_grad_(not name.startswith(("embeddings.word_embeddings", "pooler.")))
        if param.requires_grad:
            params.append(param)
    reference = {n: p.detach().clone() for n, p in model_b.named_parameters()}

    def batch_loss(step: int) -> Tensor:
        chunk = plan[step]
        batch = tokenize(tokenizer, [texts[i] for i in chunk], max_length)
        return distillation_loss(_embed_raw(model_b, batch), torch.stack([targets[i] for i in chunk]))

    with torch.no_grad():
        model_b.eval()
        initial = float(batch_loss(0))
    record = train(model_b, params, batch_loss, settings, desc="distilling B-narrow", progress=progress)
    record.update(
        loss_at_init=initial,
        projection_energy=round(energy, 4),
        texts_drawn=len(used),
        relative_change=relative_change(model_b, reference),
    )
    return record


def write_narrow(
    base: Path, out: Path, texts: Sequence[str], shape: NarrowShape, settings: TrainSettings, progress: bool
) -> dict[str, Any]:
    """Initialise B from A (folder ``base``) on ``texts``, distil it, write it to ``out``.

    The tokenizer and sentence-transformers files are A's; the pooling file states B's width.
    """
    with quiet_hf():
        model_a, tokenizer = load_encoder(base)
        model_b, record, residual = narrow_init(model_a, tokenizer, texts[:VARIANCE_TEXTS], shape)
    record.update(distill(model_b, model_a, tokenizer, texts, settings, residual, progress=progress))
    with quiet_hf():
        save_encoder(model_b, base, out)
    pooling = out / POOLING_CONFIG
    if pooling.is_file():
        config = json.loads(pooling.read_text(encoding="utf-8"))
        config["word_embedding_dimension"] = shape.hidden
        pooling.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return record


def _build_narrow(config: TextConfig, shape: NarrowShape, settings: TrainSettings) -> BuildFn:
    def build(out: Path, deps: Mapping[str, Path], progress: bool) -> dict[str, Any]:
        texts = docstrings.docstring_paragraphs(config.unlabelled)
        record = write_narrow(deps["base"], out, texts, shape, settings, progress)
        record.update(texts=len(texts), corpus_sha256=docstrings.corpus_digest(texts))
        return record

    return build


def narrow_scenario(
    name: str = "text-narrow",
    config: TextConfig | None = None,
    shape: NarrowShape = NARROW,
    settings: TrainSettings = DISTILL,
) -> Scenario:
    """The scenario ``name``: A, its data and fine-tunes; B = A narrowed to ``shape`` and distilled."""
    config = config or TextConfig()
    inner = text_scenario("text-release-short", "short", config)
    recipe = {
        "method": (
            "initialised from A by keeping, per space of the BERT spec, the units (whole heads for "
            "attention) of largest activation variance on the first docstring paragraphs; then "
            "distilled: 1 - cos(mean-pooled B, P^T mean-pooled normalised A), P the residual stream's "
            "selection map (fixed); word embeddings and pooler frozen"
        ),
        "shape": shape.to_dict(),
        "variance_texts": VARIANCE_TEXTS,
        "max_length": MAX_LENGTH,
        "unlabelled": config.unlabelled or "docstrings of the Python standard library",
        "python": _python_minor(),
        "settings": settings.to_dict(),
    }
    base_a = inner.entries["A"]
    entries: dict[str, Artifact] = {"data": inner.entries["data"], "A": base_a}
    entries["B"] = Artifact(
        "text/B-narrow",
        "model",
        recipe,
        _build_narrow(config, shape, settings),
        deps={"base": base_a},
        summary=f"B: a narrower encoder (hidden {shape.hidden}) distilled from A for {settings.steps} steps",
    )
    for task in inner.tasks:
        entries[f"A-ft/{task}"] = inner.entries[f"A-ft/{task}"]
        finetune = inner.entries[f"B-ft/{task}"]
        entries[f"B-ft/{task}"] = Artifact(
            f"text/B-narrow-ft/{task}",
            "finetune",
            dict(finetune.recipe),
            _build_finetune(config, task, f"B-ft/{task}"),
            deps={"base": entries["B"], "data": entries["data"]},
            summary=f"B (narrow) fine-tuned on {task}",
        )
    return Scenario(
        name=name,
        family="text",
        summary=(
            f"all-MiniLM-L6-v2 → a narrower encoder distilled from it (hidden {shape.hidden}, "
            f"{shape.heads} heads, FFN {shape.intermediate}); BBC News tasks"
        ),
        entries=entries,
        tasks=inner.tasks,
        real=inner.real,
        built=(
            f"B = a BERT of hidden {shape.hidden}, {shape.heads} heads and FFN {shape.intermediate} "
            "(embeddings narrowed too) initialised from A's units of largest activation variance and "
            f"distilled from A's sentence embeddings for {settings.steps} steps on Python "
            "standard-library docstrings; B's fine-tunes; the data and A's fine-tunes are "
            "text-release-short's"
        ),
        extra={"widths": {"A": 384, "B": shape.hidden}},
    )
