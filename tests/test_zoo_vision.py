"""The vision scenario builder end to end on fake Fashion-MNIST files, and GradFix on its CNNs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_zoo_fakes import tiny_vision_config

from gradfix import TaskVector, estimate_signs, mask_task_vector
from gradfix.io import load_state_dict
from gradfix.zoo import MANIFEST
from gradfix.zoo.scenario import build_scenario
from gradfix.zoo.vision import (
    SmallCNN,
    accuracy,
    as_float,
    head_loss,
    load_backbone,
    load_split,
    save_backbone,
    task_head,
    vision_scenario,
)
from gradfix.zoo.vision_data import load_sklearn_digits

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def view(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vision")
    config = tiny_vision_config(root)
    return build_scenario(
        vision_scenario("tiny-vision", config), root / "cache", log=lambda m: None, progress=False
    )


def test_view_and_manifest(view: Path) -> None:
    for entry in ("A", "B", "A-ft/fashion-new", "B-ft/fashion-new"):
        assert (view / entry / "model.safetensors").is_file() and (view / entry / "config.json").is_file()
    assert (view / "B-ft" / "fashion-new" / "head.safetensors").is_file()
    info = json.loads((view / "data" / "fashion-new" / "task.json").read_text())
    assert info["labels"][0] == "sandal" and info["counts"] == {"train": 40, "validation": 10, "test": 10}
    manifest = json.loads((view / MANIFEST).read_text())
    assert manifest["state"] == "complete" and manifest["entries"]["A"]["details"]["images"] == 30
    images, labels = load_split(view / "data" / "fashion-new", "test")
    assert images.dtype == torch.uint8 and images.shape == (10, 28, 28) and int(labels.max()) <= 4


def test_independent_bases_and_fine_tunes(view: Path) -> None:
    a, b = load_state_dict(view / "A"), load_state_dict(view / "B")
    assert set(a) == set(b) and not torch.equal(a["conv1.weight"], b["conv1.weight"])
    tau_a = TaskVector.from_checkpoints(view / "A", view / "A-ft" / "fashion-new")
    assert set(tau_a) == set(a) and any(bool(t.ne(0).any()) for t in tau_a.values())
    model_b = load_backbone(view / "B")
    head, labels = task_head(model_b, view / "data", "fashion-new")
    assert head.shape == (5, 8) and len(labels) == 5
    images, targets = load_split(view / "data" / "fashion-new", "train")
    batch = {"inputs": as_float(images[:10]), "labels": targets[:10]}
    votes = estimate_signs(model_b, [batch], head_loss(head), progress=False)
    masked = mask_task_vector(tau_a, votes)
    kept = sum(int(t.ne(0).sum()) for t in masked.values())
    assert 0 < kept < sum(t.numel() for t in tau_a.values())
    model_b.load_state_dict(masked.apply_to(model_b.state_dict(), 1.0))
    test_x, test_y = load_split(view / "data" / "fashion-new", "test")
    assert 0.0 <= accuracy(model_b, head, test_x, test_y) <= 1.0


def test_backbone_round_trip_and_digits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SmallCNN(width=4, dim=8)
    save_backbone(model, tmp_path / "m")
    again = load_backbone(tmp_path / "m")
    x = torch.rand(2, 28, 28)
    assert torch.equal(model.eval()(x), again(x))
    images, labels = load_sklearn_digits()
    assert images.shape == (1797, 28, 28) and images.dtype == torch.uint8 and int(labels.max()) == 9
    assert int(images[:, :4].max()) == 0 and int(images.max()) == 255  # centred, full range
