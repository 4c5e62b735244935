"""The far text release: BERT's masked-LM corruption and continued pre-training through a new head."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_zoo_fakes import write_fake_bbc, write_fake_python
from tiny_models import make_tiny_bert

from gradfix.io import load_state_dict
from gradfix.zoo import MANIFEST, get_scenario
from gradfix.zoo.scenario import build_scenario
from gradfix.zoo.text_mlm import IGNORE, continue_pretraining_mlm, mask_tokens
from gradfix.zoo.text_scenarios import TEXT_TASKS, TextConfig, text_scenario
from gradfix.zoo.training import TrainSettings

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_mask_tokens_follows_berts_corruption() -> None:
    ids = torch.randint(5, 1000, (200, 64))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -8:] = True
    inputs, labels = mask_tokens(
        ids, special, mask_id=3, vocab_size=1000, generator=torch.Generator().manual_seed(0)
    )
    chosen = labels != IGNORE
    assert not (chosen & special).any()
    assert (labels[chosen] == ids[chosen]).all()
    assert (inputs[~chosen] == ids[~chosen]).all()
    share = float(chosen.sum()) / float((~special).sum())
    assert 0.13 < share < 0.17
    masked = float((inputs[chosen] == 3).sum()) / float(chosen.sum())
    kept = float((inputs[chosen] == ids[chosen]).sum()) / float(chosen.sum())
    assert 0.76 < masked < 0.84 and 0.07 < kept < 0.14


def test_mask_tokens_is_seeded() -> None:
    ids = torch.randint(5, 100, (8, 16))
    special = ids < 10
    first = mask_tokens(ids, special, 3, 100, torch.Generator().manual_seed(4))
    again = mask_tokens(ids, special, 3, 100, torch.Generator().manual_seed(4))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_continued_pretraining_moves_the_encoder_only(tmp_path: Path) -> None:
    base = make_tiny_bert(tmp_path / "A", seed=0)
    texts = [f"Return the {w} of the given object and its {v} value." for w in "abcdefgh" for v in "xyz"]
    out = tmp_path / "B"
    record = continue_pretraining_mlm(
        base, out, texts, TrainSettings(steps=6, lr=1e-2, batch_size=4, seed=1), max_length=16, progress=False
    )
    a, b = load_state_dict(base), load_state_dict(out)
    assert set(a) == set(b)  # the head is not kept; the pooler is still there
    assert torch.equal(a["embeddings.word_embeddings.weight"], b["embeddings.word_embeddings.weight"])
    assert all(torch.equal(a[n], b[n]) for n in a if n.startswith("pooler."))
    assert any(not torch.equal(a[n], b[n]) for n in a if n.startswith("encoder."))
    assert record["relative_change"] > 0 and record["loss_first_tenth"] > 0
    assert (out / "vocab.txt").is_file()


def test_far_level_builds_with_its_objective(tmp_path: Path) -> None:
    src = tmp_path / "src"
    settings = TrainSettings(steps=2, lr=1e-3, batch_size=4, weight_decay=0.01, seed=1)
    config = TextConfig(
        base=str(make_tiny_bert(src / "tiny", seed=0)),
        corpus=str(write_fake_bbc(src / "bbc", articles_per_class=12)),
        unlabelled=str(write_fake_python(src / "lib")),
        caps={"validation": 8, "test": 10},
        pretrain={"short": settings, "far": settings},
        finetune={name: TrainSettings(steps=2, lr=1e-3, batch_size=4, seed=2) for name in TEXT_TASKS},
    )
    far, short = text_scenario("tiny-far", "far", config), text_scenario("tiny-short", "short", config)
    assert far.entries["B"].key() != short.entries["B"].key()
    assert far.entries["A-ft/headlines"].key() == short.entries["A-ft/headlines"].key()
    view = build_scenario(far, tmp_path / "cache", tasks=["headlines"], log=lambda m: None, progress=False)
    manifest = json.loads((view / MANIFEST).read_text())
    recipe = manifest["entries"]["B"]["recipe"]
    assert recipe["objective"] == "masked-lm" and "masked LM" in recipe["method"]
    assert (view / "B-ft" / "headlines" / "model.safetensors").is_file()
    with pytest.raises(KeyError, match="unknown objective"):
        text_scenario("bad", "far", TextConfig(pretrain={"far": settings}, objectives={"far": "denoise"}))


def test_registered_far_scenario_describes_itself() -> None:
    scenario = get_scenario("text-release-far")
    assert scenario.extra["level"] == "far" and "masked-LM" in scenario.built
    assert scenario.entries["B"].key() != get_scenario("text-release-long").entries["B"].key()
