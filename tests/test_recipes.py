"""Tests for gradfix.recipes on tiny random models built offline."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from tiny_models import (
    make_tiny_bert,
    make_tiny_gpt2,
    perturbed_copy,
    topic_examples,
    vocab_words,
    write_vocab,
)
from torch import nn
from torch.func import functional_call, grad, vmap

from gradfix.data import Example
from gradfix.errors import CheckpointError, ConfigError, DataError
from gradfix.recipes import (
    HEAD_FILENAME,
    RECIPES,
    CausalLMRecipe,
    ModuleRecipe,
    SequenceClassificationRecipe,
    TextZeroShotRecipe,
    load_recipe,
    mean_pool,
)

TOPICS = ["business", "sports", "tech"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert"), seed=0)


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory, bert_dir):
    return perturbed_copy(bert_dir, tmp_path_factory.mktemp("other"), scale=0.05, seed=1)


@pytest.fixture(scope="module")
def zero_shot(bert_dir):
    return load_recipe("text-zero-shot", bert_dir, TOPICS)


@pytest.fixture(scope="module")
def examples():
    return topic_examples(4, seed=0)


def _sample(batch, i):
    return {key: value[i : i + 1] for key, value in batch.items()}


def _per_sample_grads(model, recipe, batch):
    """Per-sample gradients of ``recipe.loss`` via functional_call + vmap(grad)."""

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, b):
            return recipe.loss(self.model, b)

    wrapper = Wrapper()
    params = {f"model.{k}": v.detach() for k, v in model.named_parameters()}

    def one(weights, sample):
        one_batch = {k: v.unsqueeze(0) for k, v in sample.items()}
        return functional_call(wrapper, weights, (one_batch,)).sum()

    return vmap(grad(one), in_dims=(None, 0))(params, batch)


def test_vocab_covers_prompts_and_topic_sentences(tmp_path, zero_shot, examples):
    assert len(vocab_words()) >= 200
    assert write_vocab(tmp_path / "v.txt").read_text().splitlines()[:5] == [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
    ]
    texts = [ex.text for ex in examples] + ["this text is about sports.", "politics, movie"]
    tokenizer = zero_shot[1].tokenizer
    for text in texts:
        assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"], text


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


def test_zero_shot_loss_per_sample_and_padding_invariant(zero_shot, examples):
    model, recipe = zero_shot
    assert recipe.use_prepared_mask
    batch = recipe.collate(examples)
    assert batch["labels"].dtype == torch.int64
    assert (batch["attention_mask"] == 0).any()  # the batch is really padded
    losses = recipe.loss(model, batch)
    assert losses.shape == (len(examples),)
    assert torch.isfinite(losses).all()
    for i, ex in enumerate(examples):
        alone = recipe.loss(model, recipe.collate([ex]))
        assert torch.allclose(alone, losses[i : i + 1], atol=1e-5)
        sliced = recipe.loss(model, _sample(batch, i))
        assert torch.allclose(sliced, losses[i : i + 1], atol=1e-5)
    plain = TextZeroShotRecipe(model, recipe.tokenizer, TOPICS, head=recipe.head, use_prepared_mask=False)
    assert torch.allclose(plain.loss(model, batch), losses, atol=1e-5)


def test_zero_shot_vmap_matches_loop_and_grads_reach_encoder(zero_shot, examples):
    model, recipe = zero_shot
    batch = recipe.collate(examples[:4])
    per_sample = _per_sample_grads(model, recipe, batch)
    name = "model.encoder.layer.0.attention.self.query.weight"
    for i in range(4):
        model.zero_grad()
        recipe.loss(model, _sample(batch, i)).sum().backward()
        loop = dict(model.named_parameters())[name[len("model.") :]].grad
        assert loop is not None and loop.abs().sum() > 0
        assert torch.allclose(per_sample[name][i], loop, atol=1e-5)
    model.zero_grad()
    assert not recipe.head.requires_grad


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_zero_shot_with_sdpa_attention(bert_dir, zero_shot, examples):
    eager_model, eager = zero_shot
    assert eager_model.config._attn_implementation == "eager"
    model, recipe = load_recipe("text-zero-shot", bert_dir, TOPICS, attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa"
    batch = recipe.collate(examples[:3])
    assert torch.allclose(recipe.loss(model, batch), eager.loss(eager_model, batch), atol=1e-5)
    name = "model.encoder.layer.1.output.dense.weight"
    sdpa_grads = _per_sample_grads(model, recipe, batch)[name]
    assert torch.allclose(sdpa_grads, _per_sample_grads(eager_model, eager, batch)[name], atol=1e-5)


def test_zero_shot_head_is_frozen_and_loss_is_pure(bert_dir, examples):
    model, recipe = load_recipe("text-zero-shot", bert_dir, TOPICS)
    head = recipe.head.clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = recipe.collate(examples)
    before = recipe.logits(model, batch)
    recipe.loss(model, batch)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    assert torch.equal(recipe.head, head)
    assert not torch.allclose(recipe.logits(model, batch), before)
    assert torch.allclose(recipe.head.norm(dim=1), torch.ones(len(TOPICS)), atol=1e-5)


def test_zero_shot_accuracy_and_collate_errors(zero_shot, examples):
    model, recipe = zero_shot
    model.train()
    acc = recipe.accuracy(model, examples, batch_size=5)
    assert 0.0 <= acc <= 1.0
    assert model.training  # mode restored
    model.eval()
    with pytest.raises(DataError, match="'cooking'"):
        recipe.collate([Example("the team won", "cooking")])
    with pytest.raises(ConfigError, match="label"):
        TextZeroShotRecipe(model, recipe.tokenizer, TOPICS, template="about {topic}")
    with pytest.raises(ConfigError, match="duplicate"):
        TextZeroShotRecipe(model, recipe.tokenizer, ["a", "a"])


def test_head_round_trip_and_reuse(tmp_path, zero_shot, examples):
    model, recipe = zero_shot
    path = recipe.save_head(tmp_path / "head" / HEAD_FILENAME)
    labels, head, template, scale = TextZeroShotRecipe.load_head(path)
    assert labels == TOPICS
    assert torch.equal(head, recipe.head)
    assert template == recipe.template == "This text is about {label}."
    assert scale == 20.0
    reordered = TextZeroShotRecipe.from_head_file(model, recipe.tokenizer, path, ["tech", "sports"])
    assert torch.equal(reordered.head, recipe.head[[2, 1]])
    with pytest.raises(ConfigError, match="politics"):
        TextZeroShotRecipe.from_head_file(model, recipe.tokenizer, path, ["politics"])
    with pytest.raises(CheckpointError, match="not found"):
        TextZeroShotRecipe.load_head(tmp_path / "missing.safetensors")


def test_load_recipe_head_sources(tmp_path, bert_dir, other_dir, zero_shot):
    _, own = zero_shot
    _, other = load_recipe("text-zero-shot", other_dir, TOPICS)
    assert not torch.allclose(own.head, other.head)
    # head_from another model folder: that folder's prompt embeddings
    _, recipe = load_recipe("text-zero-shot", bert_dir, TOPICS, head_from=other_dir)
    assert torch.allclose(recipe.head, other.head, atol=1e-6)
    # head_from a saved file, with the file's scale unless one is given
    other.logit_scale = 7.0
    path = other.save_head(tmp_path / "h.safetensors")
    _, from_file = load_recipe("text-zero-shot", bert_dir, TOPICS, head_from=path)
    assert torch.equal(from_file.head, other.head) and from_file.logit_scale == 7.0
    _, scaled = load_recipe("text-zero-shot", bert_dir, TOPICS, head_from=path, logit_scale=3.0)
    assert scaled.logit_scale == 3.0
    with pytest.raises(ConfigError, match="template"):
        load_recipe("text-zero-shot", bert_dir, TOPICS, head_from=path, template="{label}!")
    with pytest.raises(CheckpointError, match="head_from"):
        load_recipe("text-zero-shot", bert_dir, TOPICS, head_from=tmp_path / "nothing")


def test_load_recipe_uses_head_file_in_model_dir(tmp_path, other_dir, zero_shot):
    _, own = zero_shot
    folder = perturbed_copy(other_dir, tmp_path / "ft", scale=0.0, seed=0)
    own.save_head(folder / HEAD_FILENAME)
    _, recipe = load_recipe("text-zero-shot", folder, TOPICS)
    assert torch.equal(recipe.head, own.head)
    # the same through head_from=<folder with a head file>
    _, again = load_recipe("text-zero-shot", other_dir, TOPICS, head_from=folder)
    assert torch.equal(again.head, own.head)


def test_load_recipe_errors(tmp_path, bert_dir):
    built_in = {"text-zero-shot", "sequence-classification", "causal-lm", "clip-zero-shot", "seq2seq"}
    assert set(RECIPES) == built_in
    with pytest.raises(ConfigError, match="known recipes: text-zero-shot"):
        load_recipe("clip", bert_dir, TOPICS)
    with pytest.raises(CheckpointError, match="not found"):
        load_recipe("text-zero-shot", tmp_path / "missing", TOPICS)
    with pytest.raises(ConfigError, match="head_from"):
        load_recipe("sequence-classification", bert_dir, TOPICS, head_from=bert_dir)


def test_sequence_classification_label_mapping_and_loss(tmp_path, examples):
    order = ["tech", "sports", "business"]
    folder = make_tiny_bert(tmp_path / "cls", seed=3, num_labels=order)
    model, recipe = load_recipe("sequence-classification", folder, TOPICS)
    assert isinstance(recipe, SequenceClassificationRecipe)
    assert recipe.labels == order
    batch = recipe.collate(examples)
    assert batch["labels"].tolist() == [order.index(ex.label) for ex in examples]
    losses = recipe.loss(model, batch)
    assert losses.shape == (len(examples),) and torch.isfinite(losses).all()
    for i, ex in enumerate(examples[:4]):
        assert torch.allclose(recipe.loss(model, recipe.collate([ex])), losses[i], atol=1e-5)
    assert 0.0 <= recipe.accuracy(model, examples) <= 1.0
    per_sample = _per_sample_grads(model, recipe, recipe.collate(examples[:3]))
    assert per_sample["model.classifier.weight"].shape[0] == 3
    # names that are not the config's: sorted order
    unnamed = make_tiny_bert(tmp_path / "plain", seed=3, num_labels=3)
    model, recipe = load_recipe("sequence-classification", unnamed, ["b", "c", "a"])
    assert recipe.labels == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="3 labels but 2"):
        SequenceClassificationRecipe(model, recipe.tokenizer, ["a", "b"])


def test_causal_lm_recipe(tmp_path, examples):
    folder = make_tiny_gpt2(tmp_path / "gpt2", seed=0)
    model, recipe = load_recipe("causal-lm", folder, [])
    assert isinstance(recipe, CausalLMRecipe)
    assert recipe.use_prepared_mask
    batch = recipe.collate(examples)
    assert (batch["labels"] == -100).any()
    losses = recipe.loss(model, batch)
    assert losses.shape == (len(examples),) and torch.isfinite(losses).all()
    for i, ex in enumerate(examples[:4]):
        assert torch.allclose(recipe.loss(model, recipe.collate([ex])), losses[i], atol=1e-5)
    per_sample = _per_sample_grads(model, recipe, recipe.collate(examples[:2]))
    assert per_sample["model.transformer.h.0.attn.c_attn.weight"].shape[0] == 2
    with pytest.raises(ConfigError, match="no class logits"):
        recipe.logits(model, batch)
    with pytest.raises(ConfigError, match="no accuracy"):
        recipe.accuracy(model, examples)


def test_missing_transformers_gives_install_hint(monkeypatch, bert_dir):
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import gradfix.recipes, gradfix.data\n"
        "print('imported')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ConfigError, match=r"pip install gradfix\[hf\]"):
        load_recipe("text-zero-shot", bert_dir, TOPICS)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def test_module_recipe_cross_entropy_and_accuracy():
    model = _mlp()
    recipe = ModuleRecipe("cross_entropy", labels=["a", "b", "c"])
    pairs = [(torch.randn(4), i % 3) for i in range(6)]
    batch = recipe.collate(pairs)
    assert batch["inputs"].shape == (6, 4) and batch["labels"].shape == (6,)
    losses = recipe.loss(model, batch)
    expected = nn.functional.cross_entropy(model(batch["inputs"]), batch["labels"], reduction="none")
    assert torch.allclose(losses, expected)
    assert torch.allclose(recipe(model, _sample(batch, 2)), losses[2:3])
    assert 0.0 <= recipe.accuracy(model, pairs, batch_size=4) <= 1.0
    per_sample = _per_sample_grads(model, recipe, batch)
    assert per_sample["model.0.weight"].shape == (6, 8, 4)


def test_module_recipe_mse_and_custom_losses():
    model = _mlp()
    batch = {"inputs": torch.randn(5, 4), "labels": torch.randn(5, 3)}
    losses = ModuleRecipe("mse").loss(model, batch)
    assert torch.allclose(losses, ((model(batch["inputs"]) - batch["labels"]) ** 2).mean(dim=1))
    custom = ModuleRecipe(lambda out, y: (out - y).abs())
    assert custom.loss(model, batch).shape == (5,)
    scalar = ModuleRecipe(lambda out, y: nn.functional.mse_loss(out, y))
    with pytest.raises(ConfigError, match=r"scalar.*reduction='none'"):
        scalar.loss(model, batch)
    wrong = ModuleRecipe(lambda out, y: out.sum(dim=0))
    with pytest.raises(ConfigError, match="first dimension"):
        wrong.loss(model, batch)
    with pytest.raises(ConfigError, match="unknown loss"):
        ModuleRecipe("hinge")
    with pytest.raises(DataError, match="pair"):
        ModuleRecipe().collate([torch.zeros(4)])
