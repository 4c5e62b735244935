"""The cross-width vision scenario on fake Fashion-MNIST files, and the crosswidth experiment on it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from test_zoo_fakes import tiny_vision_config

from gradfix import ConfigError, TaskVector
from gradfix.io import load_state_dict
from gradfix.zoo import MANIFEST, get_scenario, scenario_names
from gradfix.zoo.scenario import build_scenario
from gradfix.zoo.vision import VisionConfig, load_backbone, vision_scenario
from gradfix.zoo.vision_widths import vision_widths_scenario

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "crosswidth.py"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, VisionConfig]:
    root = tmp_path_factory.mktemp("widths")
    config = tiny_vision_config(root)
    scenario = vision_widths_scenario("tiny-widths", config, width_b=2)
    view = build_scenario(scenario, root / "cache", log=lambda m: None, progress=False)
    return view, root / "cache", config


def test_registered_and_shares_the_width_32_artifacts() -> None:
    assert "vision-widths" in scenario_names()
    widths, independent = get_scenario("vision-widths"), vision_scenario()
    assert widths.tasks == independent.tasks and widths.extra == {"widths": {"A": 32, "B": 16}}
    for entry in ("data", "A", *(f"A-ft/{t}" for t in widths.tasks)):
        assert widths.entries[entry].key() == independent.entries[entry].key()
        assert widths.entries[entry].name == independent.entries[entry].name
    for entry in ("B", *(f"B-ft/{t}" for t in widths.tasks)):
        assert widths.entries[entry].key() != independent.entries[entry].key()
        assert widths.entries[entry].name.startswith("vision/B-w16")
    assert widths.entries["B"].recipe["architecture"] == {"width": 16, "dim": 128}
    assert widths.entries["B"].recipe["init_seed"] == independent.entries["B"].recipe["init_seed"]


def test_narrow_b_built_and_a_reused(built: tuple[Path, Path, VisionConfig]) -> None:
    view, cache, config = built
    independent = vision_scenario("tiny-vision", config)
    assert independent.entries["A"].is_built(cache) and independent.entries["A-ft/fashion-new"].is_built(
        cache
    )
    assert not independent.entries["B"].is_built(cache)  # only the narrow B was built
    model_a, model_b = load_backbone(view / "A"), load_backbone(view / "B")
    assert (model_a.width, model_b.width, model_b.dim) == (4, 2, 8)
    assert load_state_dict(view / "B-ft" / "fashion-new")["conv2.weight"].shape == (4, 2, 3, 3)
    assert (view / "B-ft" / "fashion-new" / "head.safetensors").is_file()
    manifest = json.loads((view / MANIFEST).read_text())
    assert manifest["state"] == "complete" and manifest["widths"] == {"A": 4, "B": 2}
    assert manifest["entries"]["B"]["details"]["images"] == 30  # half B of the pre-training images
    with pytest.raises(ConfigError, match="must differ"):
        vision_widths_scenario("same", config, width_b=4)


def test_crosswidth_experiment_rows(built: tuple[Path, Path, VisionConfig]) -> None:
    view, _, _ = built
    spec = importlib.util.spec_from_file_location("crosswidth", EXPERIMENT)
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    tau = TaskVector.from_checkpoints(view / "A", view / "A-ft" / "fashion-new")
    cut = experiment.truncate(tau, {n: tuple(t.shape) for n, t in load_state_dict(view / "B").items()})
    torch.testing.assert_close(cut["conv2.weight"], tau["conv2.weight"][:4, :2])
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 2, 0])
    shots = experiment.draw_shots(labels, 2, seed=0)
    assert torch.equal(labels[shots].bincount(), torch.tensor([2, 2, 2]))
    assert torch.equal(shots, experiment.draw_shots(labels, 2, seed=0))

    rows = experiment.run_task(view, "fashion-new", [0, 1], shots=2, stat_images=16, scenario="tiny-widths")
    methods = [r["method"] for r in rows]
    assert methods == [
        "fine-tuned A (source)",
        "zero-shot B",
        "fine-tuned B",
        "naive (truncated τ_A)",
        "Theseus (activations)",
        "Theseus (data-free)",
        "GradFix on Theseus",
        "GradFix on Theseus",
    ]
    keys = {"scenario", "task", "method", "seed", "k", "alpha", "validation", "test", "seconds"}
    assert all(set(r) == keys and 0.0 <= r["test"] <= 1.0 for r in rows)
    assert [r["seed"] for r in rows[-2:]] == [0, 1] and rows[-1]["k"] == 2
    assert all(r["alpha"] in experiment.ALPHAS for r in rows[3:])
