"""The instruction-tuned release: B = all-MiniLM-L6-v2 trained supervised on labelled tasks of its own.

The analogue of an instruction-tuned model (FLAN-T5 after T5): A is trained on several labelled
tasks together, each phrased as an instruction with its own label template, none of them an
evaluation task. The tasks are built from the docstrings of Python's standard library
(:func:`docstring_passages`: every paragraph with where it comes from), so they share neither
texts nor labels with the BBC News tasks:

- ``package``: which of eight package groups a docstring paragraph documents (asyncio,
  collections, email, http — ``http`` and ``urllib`` —, json, logging, unittest, xml);
- ``kind``: whether a paragraph belongs to the docstring of a class, a function (or method) or a
  module (the whole standard library);
- ``pair``: whether two paragraphs come from the same module (``same``) or not (``different``).

Every paragraph falls in ``train`` or ``validation`` by a seeded hash of its text, so one
paragraph never serves both; the examples of each split are capped per class in a seeded order
and written sorted. :func:`train_multitask` trains through each task's frozen zero-shot head (the
prompts of its labels embedded by A, as :func:`~gradfix.zoo.text.finetune_zero_shot` does), one
batch of every task per step, their mean loss, word embeddings and pooler frozen like the other
releases.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradfix.data import Example, label_set, load_examples
from gradfix.errors import DataError
from gradfix.zoo.docstrings import corpus_digest, paragraphs, parsed_files, stdlib_folder
from gradfix.zoo.text import (
    TextTask,
    accuracy,
    load_encoder,
    relative_change,
    release_parameters,
    save_encoder,
    zero_shot_recipe,
)
from gradfix.zoo.training import TrainSettings, seeded_batches, train

SPLITS = ("train", "validation")
KINDS: dict[type, str] = {
    ast.Module: "module",
    ast.ClassDef: "class",
    ast.FunctionDef: "function",
    ast.AsyncFunctionDef: "function",
}
"""Docstring owner → the ``kind`` task's label (methods are functions)."""
_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
PAIR_LABELS = ("different", "same")
BUILDERS = ("package", "kind", "pair")
"""The task names :func:`build_instruct_tasks` knows how to build."""


@dataclass(frozen=True)
class InstructTask:
    """One training task of the release: the instruction before each text and its head's template."""

    name: str
    instruction: str
    template: str
    max_length: int
    description: str = ""

    def head_task(self) -> TextTask:
        """The :class:`TextTask` of the zero-shot head (template and token limit)."""
        return TextTask(self.name, self.template, self.max_length, self.description)

    def to_dict(self) -> dict[str, Any]:
        """The task as a plain dict."""
        return asdict(self)


INSTRUCT_TASKS: dict[str, InstructTask] = {
    "package": InstructTask(
        "package",
        "Which standard-library package does this documentation belong to?",
        "This is the documentation of the Python {label} package.",
        48,
        "the package group of a standard-library docstring paragraph (8 classes)",
    ),
    "kind": InstructTask(
        "kind",
        "Does this docstring describe a class, a function or a module?",
        "This docstring describes a {label}.",
        48,
        "whether a docstring paragraph documents a class, a function or a module (3 classes)",
    ),
    "pair": InstructTask(
        "pair",
        "Do these two passages come from the same module?",
        "The two passages come from {label} modules.",
        64,
        "whether two docstring paragraphs come from the same source file (2 classes)",
    ),
}

PACKAGE_GROUPS: dict[str, tuple[str, ...]] = {
    "asyncio": ("asyncio",),
    "collections": ("collections",),
    "email": ("email",),
    "http": ("http", "urllib"),
    "json": ("json",),
    "logging": ("logging",),
    "unittest": ("unittest",),
    "xml": ("xml",),
}
"""The ``package`` task's classes: label → top-level names (a package folder or a module) under the root."""


def _default_caps() -> dict[str, int]:
    return {"train": 300, "validation": 40}


def _default_pairs() -> dict[str, int]:
    return {"train": 1800, "validation": 200}


@dataclass(frozen=True)
class InstructConfig:
    """What decides the release's training data: tasks, package groups, split, caps, seed.

    ``caps`` bound the examples of each class per split (``package`` and ``kind``); ``pairs`` is
    the number of ``pair`` examples per split (half ``same``); a pair's passages are cut to
    ``pair_words`` words each.
    """

    tasks: Mapping[str, InstructTask] = field(default_factory=lambda: dict(INSTRUCT_TASKS))
    packages: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(PACKAGE_GROUPS))
    seed: int = 0
    validation_share: float = 0.1
    caps: Mapping[str, int] = field(default_factory=_default_caps)
    pairs: Mapping[str, int] = field(default_factory=_default_pairs)
    pair_words: int = 20
    min_words: int = 6

    def recipe(self) -> dict[str, Any]:
        """Every setting as plain JSON (the data artifact's recipe)."""
        return {
            "tasks": {name: task.to_dict() for name, task in sorted(self.tasks.items())},
            "packages": {label: list(tops) for label, tops in sorted(self.packages.items())},
            "seed": self.seed,
            "validation_share": self.validation_share,
            "caps_per_class": dict(self.caps),
            "pairs": dict(self.pairs),
            "pair_words": self.pair_words,
            "min_words": self.min_words,
        }


@dataclass(frozen=True)
class Passage:
    """A docstring paragraph, the file it comes from (relative, POSIX) and its owner's kind."""

    module: str
    kind: str
    text: str

    @property
    def top(self) -> str:
        """The top-level name under the root: ``email`` for ``email/utils.py``, ``json`` for ``json.py``."""
        return self.module.split("/", 1)[0].removesuffix(".py")


def docstring_passages(root: str | Path | None = None, min_words: int = 6) -> list[Passage]:
    """Every docstring paragraph under ``root`` (default: the standard library) with its place.

    The files and paragraphs are those of :func:`~gradfix.zoo.docstrings.docstring_paragraphs`
    (sorted files, parsed and never imported, tests skipped); a paragraph met twice keeps its
    first place. Raises :class:`DataError` when there is none.
    """
    folder = Path(root) if root is not None else stdlib_folder()
    seen: dict[str, Passage] = {}
    for path, tree in parsed_files(folder):
        module = path.relative_to(folder).as_posix()
        for node in ast.walk(tree):
            if isinstance(node, _OWNERS):
                doc = ast.get_docstring(node) or ""
                for text in paragraphs(doc, min_words):
                    seen.setdefault(text, Passage(module, KINDS[type(node)], text))
    if not seen:
        raise DataError(f"{folder}: no docstrings found")
    return list(seen.values())


def _rank(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}\n{text}".encode()).hexdigest()


def split_of(text: str, seed: int, validation_share: float) -> str:
    """``validation`` for a seeded-hash share of the texts, ``train`` for the rest."""
    return "validation" if int(_rank(seed, text)[:8], 16) < validation_share * 16**8 else "train"


def _capped(
    items: Sequence[tuple[str, Passage]], task: InstructTask, cap: int, seed: int
) -> Iterator[Example]:
    """At most ``cap`` examples per label, drawn in the seeded-hash order of their texts."""
    per_label: dict[str, list[Passage]] = {}
    for label, passage in items:
        per_label.setdefault(label, []).append(passage)
    for label, group in sorted(per_label.items()):
        for passage in sorted(group, key=lambda p: _rank(seed, p.text))[:cap]:
            yield Example(f"{task.instruction} {passage.text}", label)


def _clip(text: str, words: int) -> str:
    return " ".join(text.split()[:words])


def _pair_examples(
    passages: Sequence[Passage], config: InstructConfig, count: int, salt: int
) -> list[Example]:
    """``count`` pairs, alternately from one module (``same``) and from two (``different``)."""
    by_module: dict[str, list[Passage]] = {}
    for passage in passages:
        by_module.setdefault(passage.module, []).append(passage)
    modules = sorted(by_module)
    several = [m for m in modules if len(by_module[m]) >= 2]
    if len(modules) < 2 or not several:
        raise DataError("the pair task needs two modules and one with two paragraphs or more")
    rng = random.Random(config.seed * 1000 + salt)
    task, rows = config.tasks["pair"], []
    for i in range(count):
        if i % 2 == 0:
            first, second = rng.sample(by_module[rng.choice(several)], 2)
        else:
            one, other = rng.sample(modules, 2)
            first, second = rng.choice(by_module[one]), rng.choice(by_module[other])
        text = (
            f"{task.instruction} First passage: {_clip(first.text, config.pair_words)} "
            f"Second passage: {_clip(second.text, config.pair_words)}"
        )
        rows.append(Example(text, PAIR_LABELS[1] if i % 2 == 0 else PAIR_LABELS[0]))
    return rows


def build_instruct_tasks(
    passages: Sequence[Passage], config: InstructConfig
) -> dict[str, dict[str, list[Example]]]:
    """``{task: {split: examples}}`` of :data:`SPLITS`, each list sorted by label and text."""
    unknown = sorted(set(config.tasks) - set(BUILDERS))
    if unknown:
        raise DataError(f"unknown instruction task(s) {unknown}; known: {', '.join(BUILDERS)}")
    groups = {top: label for label, tops in config.packages.items() for top in tops}
    parts: dict[str, list[Passage]] = {split: [] for split in SPLITS}
    for passage in passages:
        parts[split_of(passage.text, config.seed, config.validation_share)].append(passage)
    out: dict[str, dict[str, list[Example]]] = {name: {} for name in config.tasks}
    for salt, split in enumerate(SPLITS):
        part, cap = parts[split], config.caps[split]
        made: dict[str, list[Example]] = {}
        if "package" in config.tasks:
            labelled = [(groups[p.top], p) for p in part if p.top in groups]
            made["package"] = list(_capped(labelled, config.tasks["package"], cap, config.seed))
        if "kind" in config.tasks:
            made["kind"] = list(_capped([(p.kind, p) for p in part], config.tasks["kind"], cap, config.seed))
        if "pair" in config.tasks:
            made["pair"] = _pair_examples(part, config, config.pairs[split], salt)
        for name, rows in made.items():
            if not rows:
                raise DataError(f"instruction task {name!r}: no {split} examples")
            out[name][split] = sorted(rows, key=lambda e: (e.label, e.text))
    return out


def write_instruct_tasks(out: Path, root: str | None, config: InstructConfig) -> dict[str, Any]:
    """Write ``out/<task>/{train,validation}.jsonl`` and ``task.json``; return the counts."""
    passages = docstring_passages(root, config.min_words)
    tasks = build_instruct_tasks(passages, config)
    counts: dict[str, Any] = {}
    for name, splits in tasks.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            lines = [json.dumps({"text": e.text, "label": e.label}, ensure_ascii=False) for e in rows]
            (folder / f"{split}.jsonl").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        labels = label_set(splits["train"])
        per_split = {
            s: {lab: sum(e.label == lab for e in rows) for lab in labels} for s, rows in splits.items()
        }
        info = {**config.tasks[name].to_dict(), "labels": labels, "counts": per_split}
        (folder / "task.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        counts[name] = {split: len(rows) for split, rows in splits.items()}
    counts["passages"] = len(passages)
    counts["corpus_sha256"] = corpus_digest([p.text for p in passages])
    return counts


def train_multitask(
    base: str | Path,
    out: Path,
    data: Path,
    tasks: Mapping[str, InstructTask],
    settings: TrainSettings,
    progress: bool = True,
    desc: str = "instruction tuning",
) -> dict[str, Any]:
    """Train ``base`` on every task under ``data`` together; write the new encoder into ``out``.

    Each task is read from ``data/<task>/`` (as :func:`write_instruct_tasks` writes it) and gets
    a zero-shot head embedded by ``base`` before training (frozen). Each step draws
    ``settings.batch_size`` examples of every task (seeded per task) and minimises the mean of
    the tasks' cross-entropies. Every parameter but the word embeddings and the pooler is trained.
    Returns the training record with each task's validation accuracy before and after and the
    relative change ``‖θ_new − θ‖ / ‖θ‖`` of the trained parameters.
    """
    model, tokenizer = load_encoder(base)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = release_parameters(model)
    names = sorted(tasks)
    recipes, batches, validation = {}, {}, {}
    for i, name in enumerate(names):
        labels = json.loads((data / name / "task.json").read_text(encoding="utf-8"))["labels"]
        recipes[name] = zero_shot_recipe(model, tokenizer, labels, tasks[name].head_task())
        batches[name] = seeded_batches(
            load_examples(data / name / "train.jsonl"), settings.batch_size, settings.seed + i
        )
        validation[name] = load_examples(data / name / "validation.jsonl")
    before = {name: accuracy(model, recipes[name], validation[name]) for name in names}

    def step_loss(step: int) -> torch.Tensor:
        losses = [recipes[n].loss(model, recipes[n].collate(next(batches[n]))).mean() for n in names]
        return torch.stack(losses).mean()

    record = train(model, params, step_loss, settings, desc=desc, progress=progress)
    record["validation_before"] = before
    record["validation_after"] = {name: accuracy(model, recipes[name], validation[name]) for name in names}
    record["relative_change"] = relative_change(model, reference)
    save_encoder(model, base, out)
    return record
