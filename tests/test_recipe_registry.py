"""Tests for the recipe registry: families by name, what each knows about a target's labels."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from gradfix.errors import ConfigError, DataError
from gradfix.jobs.adaptive import correct_predictions, plan_choice
from gradfix.jobs.inputs import target_label_set
from gradfix.methods import resolve_method
from gradfix.recipes import (
    HEAD_FILENAME,
    RECIPES,
    CausalLMRecipe,
    ClipZeroShotRecipe,
    ModuleRecipe,
    Recipe,
    RecipeFamily,
    Seq2SeqRecipe,
    SequenceClassificationRecipe,
    TextZeroShotRecipe,
    get_recipe,
    load_recipe,
    register_recipe,
)
from gradfix.settings import MaskSettings, VoteSettings

BUILT_IN = ["text-zero-shot", "sequence-classification", "causal-lm", "clip-zero-shot", "seq2seq"]
UNKNOWN = "unknown recipe 'clip'; known recipes: " + ", ".join(BUILT_IN)


class _ToyLinear(RecipeFamily):
    """A linear classifier on 4 features, its weights in ``toy.pt``, its labels in ``labels.txt``."""

    name = "toy-linear"
    summary = "a linear classifier on 4 features"
    recipe_class = ModuleRecipe

    def build(self, model_dir, labels: Sequence[str], options) -> tuple[nn.Module, Recipe]:
        """The linear layer with the folder's weights and a cross-entropy recipe over ``labels``."""
        model = nn.Linear(4, len(labels))
        model.load_state_dict(torch.load(Path(model_dir) / "toy.pt"))
        return model.eval(), self.recipe_class("cross_entropy", labels=labels)

    def known_labels(self, target, head_from=None):
        """The lines of ``labels.txt``."""
        path = Path(target) / "labels.txt"
        return (path.read_text().split(), f"the labels of {path}") if path.is_file() else None


class _NoLogits(ModuleRecipe):
    """A module recipe that declares it cannot score accuracy."""

    scores_accuracy = False


class _ToyRegression(_ToyLinear):
    """The toy family with a recipe without class logits."""

    name = "toy-regression"
    recipe_class = _NoLogits


@pytest.fixture
def toy_families():
    """Register the toy families for one test, then remove them."""
    register_recipe(_ToyLinear)
    register_recipe(_ToyRegression)
    yield
    RECIPES.pop("toy-linear")
    RECIPES.pop("toy-regression")


@pytest.fixture
def toy_dir(tmp_path):
    torch.manual_seed(0)
    torch.save(nn.Linear(4, 2).state_dict(), tmp_path / "toy.pt")
    (tmp_path / "labels.txt").write_text("no\nyes\n")
    return tmp_path


def test_built_in_families_in_order():
    assert list(RECIPES) == BUILT_IN
    assert "causal-lm" in RECIPES and "clip" not in RECIPES
    classes = [
        TextZeroShotRecipe,
        SequenceClassificationRecipe,
        CausalLMRecipe,
        ClipZeroShotRecipe,
        Seq2SeqRecipe,
    ]
    for name, recipe_class in zip(BUILT_IN, classes, strict=True):
        family = get_recipe(name)
        assert family is RECIPES[name] and family.name == name and family.summary
        assert family.recipe_class is recipe_class
    assert [get_recipe(n).scores_accuracy for n in BUILT_IN] == [True, True, False, True, True]


def test_unknown_recipe_lists_the_choices(tmp_path):
    for call in (
        lambda: get_recipe("clip"),
        lambda: load_recipe("clip", tmp_path, ["a"]),
        lambda: target_label_set("clip", tmp_path),
    ):
        with pytest.raises(ConfigError) as info:
            call()
        assert str(info.value) == UNKNOWN
    with pytest.raises(ConfigError, match="unknown recipe"):
        get_recipe(["not", "a", "name"])  # type: ignore[arg-type]


def test_register_twice_is_refused(toy_families):
    with pytest.raises(ValueError, match="registered twice"):
        register_recipe(_ToyLinear)


def test_toy_family_is_found_by_name(toy_families, toy_dir):
    assert list(RECIPES)[-2:] == ["toy-linear", "toy-regression"]
    model, recipe = load_recipe("toy-linear", toy_dir, ["no", "yes"])
    assert isinstance(recipe, ModuleRecipe) and recipe.labels == ["no", "yes"]
    batch = recipe.collate([(torch.randn(4), 0), (torch.randn(4), 1), (torch.randn(4), 1)])
    assert recipe.loss(model, batch).shape == (3,)
    assert get_recipe("toy-linear")(toy_dir, ["no", "yes"])[1].labels == ["no", "yes"]
    assert target_label_set("toy-linear", toy_dir) == (["no", "yes"], f"the labels of {toy_dir}/labels.txt")
    correct = correct_predictions(recipe)
    assert correct is not None and correct(model, batch).shape == (3,)
    assert correct_predictions(load_recipe("toy-regression", toy_dir, ["no", "yes"])[1]) is None


def test_validation_needs_a_family_that_scores_accuracy(toy_families, tmp_path):
    method, masking = resolve_method("adaptive", MaskSettings(validation=str(tmp_path / "v.jsonl")))
    for name in ("causal-lm", "toy-regression"):
        message = f"--validation scores candidates by accuracy, which the {name} recipe has not"
        with pytest.raises(ConfigError, match=message):
            plan_choice(method, masking, VoteSettings(recipe=name), tmp_path)
    with pytest.raises(DataError, match="--validation"):  # a scoring family goes on to read the file
        plan_choice(method, masking, VoteSettings(recipe="toy-linear"), tmp_path)


def test_correct_predictions_follows_scores_accuracy():
    assert correct_predictions(CausalLMRecipe.__new__(CausalLMRecipe)) is None
    assert correct_predictions(ModuleRecipe()) is not None
    assert correct_predictions(object()) is None


def _save_head(path: Path, labels: object) -> Path:
    metadata = {"labels": json.dumps(labels)} if labels is not None else {}
    save_file({"head": torch.zeros(2, 3)}, str(path), metadata=metadata)
    return path


def test_zero_shot_known_labels(tmp_path):
    family = get_recipe("text-zero-shot")
    assert family.known_labels(tmp_path) is None  # prompts can embed any label
    own = _save_head(tmp_path / HEAD_FILENAME, ["sports", "tech"])
    assert family.known_labels(tmp_path) == (["sports", "tech"], f"the zero-shot head {own}")
    other = tmp_path / "other"
    other.mkdir()
    head = _save_head(other / HEAD_FILENAME, ["a", "b"])
    assert family.known_labels(tmp_path, head_from=other) == (["a", "b"], f"the zero-shot head {head}")
    assert family.known_labels(tmp_path, head_from=head)[0] == ["a", "b"]
    assert family.known_labels(tmp_path, head_from=tmp_path / "missing") is None
    assert family.known_labels(tmp_path, head_from=_save_head(tmp_path / "n.st", [1, 2])) is None
    assert family.known_labels(tmp_path, head_from=_save_head(tmp_path / "m.st", None)) is None
    (tmp_path / "bad.st").write_bytes(b"not safetensors")
    assert family.known_labels(tmp_path, head_from=tmp_path / "bad.st") is None


def _config(folder: Path, text: str) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(text)
    return folder


def test_sequence_classification_known_labels(tmp_path):
    family = get_recipe("sequence-classification")
    named = _config(tmp_path / "named", json.dumps({"id2label": {"0": "neg", "1": "pos"}}))
    assert family.known_labels(named) == (["neg", "pos"], f"the id2label of {named}/config.json")
    generic = _config(tmp_path / "generic", json.dumps({"id2label": {"0": "LABEL_0", "1": "LABEL_1"}}))
    assert family.known_labels(generic) is None
    assert family.known_labels(_config(tmp_path / "empty", json.dumps({"id2label": {}}))) is None
    assert family.known_labels(_config(tmp_path / "broken", "{not json")) is None
    assert family.known_labels(_config(tmp_path / "list", "[1, 2]")) is None
    assert family.known_labels(tmp_path / "missing") is None
    assert target_label_set("sequence-classification", named) == family.known_labels(named)


def test_causal_lm_has_no_label_set(tmp_path):
    _save_head(tmp_path / HEAD_FILENAME, ["a", "b"])
    assert get_recipe("causal-lm").known_labels(tmp_path) is None
    assert target_label_set("causal-lm", tmp_path, tmp_path) is None
