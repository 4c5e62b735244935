"""The text scenario builder end to end, with a tiny BERT standing in for all-MiniLM-L6-v2."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from test_zoo_fakes import write_fake_bbc, write_fake_python
from tiny_models import make_tiny_bert

from gradfix.io import load_state_dict
from gradfix.jobs import MaskSettings, VoteSettings, evaluate_model, transport_checkpoints
from gradfix.zoo import MANIFEST
from gradfix.zoo.scenario import build_scenario, scenario_status
from gradfix.zoo.text_scenarios import TEXT_TASKS, TextConfig, text_scenario
from gradfix.zoo.training import TrainSettings, cosine_with_warmup, seeded_batches

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _config(src: Path) -> TextConfig:
    return TextConfig(
        base=str(make_tiny_bert(src / "tiny", seed=0)),
        corpus=str(write_fake_bbc(src / "bbc", articles_per_class=12)),
        unlabelled=str(write_fake_python(src / "lib")),
        caps={"validation": 8, "test": 10},
        pretrain={"short": TrainSettings(steps=3, lr=1e-3, batch_size=4, weight_decay=0.01, seed=1)},
        finetune={name: TrainSettings(steps=3, lr=1e-3, batch_size=4, seed=2) for name in TEXT_TASKS},
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("zoo")
    config = _config(root / "src")
    scenario = text_scenario("tiny-text", "short", config)
    messages: list[str] = []
    view = build_scenario(scenario, root / "cache", log=messages.append, progress=False)
    return {"root": root, "config": config, "scenario": scenario, "view": view, "messages": messages}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_view_holds_every_entry_and_a_complete_manifest(built: dict) -> None:
    view: Path = built["view"]
    for entry in ("A", "B", *(f"{t}-ft/{task}" for t in "AB" for task in TEXT_TASKS)):
        assert (view / entry / "model.safetensors").is_file(), entry
        assert (view / entry / "config.json").is_file() and (view / entry / "vocab.txt").is_file()
    for task in TEXT_TASKS:
        for split in ("train", "validation", "test"):
            assert (view / "data" / task / f"{split}.jsonl").is_file()
        info = json.loads((view / "data" / task / "task.json").read_text())
        assert info["template"] == TEXT_TASKS[task].template and info["labels"]
        assert (view / "A-ft" / task / "zero_shot_head.safetensors").is_file()
    assert (view / "data" / "support" / "retrieval.jsonl").is_file()
    manifest = json.loads((view / MANIFEST).read_text())
    assert manifest["state"] == "complete" and manifest["family"] == "text"
    record = manifest["entries"]["B"]
    assert record["recipe"]["settings"]["steps"] == 3 and record["details"]["texts"] > 0
    assert "transformers" in record["versions"] and record["wall_seconds"] >= 0
    ft = manifest["entries"]["A-ft/headlines"]["details"]
    assert {"validation_zero_shot", "validation_finetuned", "train_examples"} <= set(ft)


def test_models_change_only_where_trained(built: dict) -> None:
    view: Path = built["view"]
    a, b, a_ft = (load_state_dict(view / p) for p in ("A", "B", "A-ft/headlines"))
    word = "embeddings.word_embeddings.weight"
    assert (a[word] == b[word]).all() and (a[word] == a_ft[word]).all()
    assert any(not (a[n] == b[n]).all() for n in a if n.startswith("encoder."))
    changed = {n for n in a if a[n].is_floating_point() and not (a[n] == a_ft[n]).all()}
    assert changed and all(n.startswith("encoder.") for n in changed)


def test_a_fine_tunes_are_shared_and_nothing_is_rebuilt(built: dict) -> None:
    root: Path = built["root"]
    messages: list[str] = []
    build_scenario(built["scenario"], root / "cache", log=messages.append, progress=False)
    assert not any(m.startswith("building") for m in messages)
    other = text_scenario("tiny-text-2", "short", built["config"])
    assert other.entries["A-ft/style"].key() == built["scenario"].entries["A-ft/style"].key()
    assert scenario_status(other, root / "cache")["state"] == "complete"


def test_same_recipe_builds_the_same_files(built: dict, tmp_path: Path) -> None:
    view: Path = built["view"]
    again = build_scenario(
        built["scenario"], tmp_path / "cache", tasks=["headlines"], log=lambda m: None, progress=False
    )
    for rel in ("data/headlines/train.jsonl", "data/headlines/test.jsonl", "data/articles.json"):
        assert _sha(view / rel) == _sha(again / rel), rel
    for rel in ("B/model.safetensors", "A-ft/headlines/model.safetensors"):
        assert _sha(view / rel) == _sha(again / rel), rel


def test_transport_and_eval_jobs_read_the_view(built: dict, tmp_path: Path) -> None:
    view: Path = built["view"]
    data = view / "data" / "headlines"
    out = tmp_path / "B-transported"
    record = transport_checkpoints(
        view / "A",
        view / "A-ft" / "headlines",
        view / "B",
        out,
        VoteSettings(
            data=str(data / "train.jsonl"),
            shots=1,
            template=TEXT_TASKS["headlines"].template,
            max_length=24,
            progress=False,
        ),
        MaskSettings(include=["encoder.*"]),
        method="gradfix",
    )
    assert record["num_samples"] == 3 and (out / "zero_shot_head.safetensors").is_file()
    result = evaluate_model(out, data / "test.jsonl", max_length=24)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["examples"] > 0


def test_schedule_and_batches() -> None:
    assert cosine_with_warmup(0, 10, 2) == pytest.approx(0.5)
    assert cosine_with_warmup(2, 10, 2) == pytest.approx(1.0)
    assert cosine_with_warmup(9, 10, 2) < 0.1
    first = seeded_batches(list(range(10)), 4, seed=0)
    again = seeded_batches(list(range(10)), 4, seed=0)
    batches = [next(first) for _ in range(4)]
    assert batches == [next(again) for _ in range(4)]
    assert len(set(batches[0]) | set(batches[1])) == 8  # one epoch: no item twice
    assert all(len(b) == 4 for b in batches)


def test_support_retrieval_check(built: dict) -> None:
    from gradfix.zoo.text import load_encoder, read_jsonl, retrieval_accuracy

    view: Path = built["view"]
    pairs = read_jsonl(view / "data" / "support" / "retrieval.jsonl")
    model, tokenizer = load_encoder(view / "B")
    score = retrieval_accuracy(model, tokenizer, pairs)
    assert 0.0 <= score <= 1.0
    same = [{"query": p["document"], "document": p["document"]} for p in pairs]
    assert retrieval_accuracy(model, tokenizer, same) == 1.0
