"""Per-sample gradient engines on transformer layers: votes equal a loop of one backward per sample."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_bert, make_tiny_gpt2, topic_examples
from torch import nn

from gradfix import estimate_signs
from gradfix.recipes import load_recipe
from gradfix.votes.hooks import hooked_parameters, outside_use

NOISE = 1e-12


def _brute_force_counts(model: nn.Module, batch: dict, loss_fn) -> dict[str, torch.Tensor]:
    """Votes of a loop of one backward pass per sample.

    Tensors whose every per-sample gradient is below ``NOISE`` are left out: their gradient is
    zero in exact arithmetic (the attention key bias shifts every score of a query by the same
    amount, which the softmax ignores), so the sign of what float64 computes is rounding noise
    that differs with the order of any two summations.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    counts = {n: torch.zeros(p.shape, dtype=torch.int64) for n, p in params.items()}
    largest = dict.fromkeys(params, 0.0)
    size = next(iter(batch.values())).shape[0]
    for i in range(size):
        loss = loss_fn(model, {k: v[i : i + 1] for k, v in batch.items()}).sum()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, _), g in zip(params.items(), grads, strict=True):
            if g is not None:
                counts[name] += torch.sign(-g).long()
                largest[name] = max(largest[name], float(g.abs().max()))
    noise = [n for n, v in largest.items() if 0 < v < NOISE]
    assert all(n.endswith("attention.self.key.bias") for n in noise), noise
    return {n: c for n, c in counts.items() if n not in noise}


@pytest.fixture(scope="module")
def bert_recipe(tmp_path_factory):
    folder = make_tiny_bert(tmp_path_factory.mktemp("bert") / "m", seed=0)
    examples = topic_examples(3, seed=0)
    labels = sorted({e.label for e in examples})
    model, recipe = load_recipe("text-zero-shot", folder, labels)
    model.double()
    recipe.head = recipe.head.double()
    return model, recipe, recipe.collate(examples)


@pytest.mark.parametrize("engine", ["hooks", "auto"])
def test_hooks_on_bert_equal_brute_force_with_trainable_embeddings(bert_recipe, engine) -> None:
    model, recipe, batch = bert_recipe
    covered = {
        n
        for names in hooked_parameters(model, dict(model.named_parameters())).values()
        for n in names.values()
    }
    assert "embeddings.word_embeddings.weight" in covered
    assert "encoder.layer.0.attention.self.query.weight" in covered
    assert "encoder.layer.1.output.LayerNorm.weight" in covered
    expected = _brute_force_counts(model, batch, recipe.loss)
    votes = estimate_signs(model, [batch], recipe.loss, engine=engine, progress=False)
    wrong = [n for n, counts in expected.items() if not torch.equal(votes.counts[n].long(), counts)]
    assert wrong == [], wrong
    # rows of the vocabulary that no example uses cast no vote
    assert int(votes.counts["embeddings.word_embeddings.weight"].ne(0).any(dim=1).sum()) < 215


def test_hooks_with_frozen_parts_and_several_batches(bert_recipe) -> None:
    model, recipe, batch = bert_recipe
    model.embeddings.word_embeddings.weight.requires_grad_(False)
    try:
        halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
        expected = _brute_force_counts(model, batch, recipe.loss)
        votes = estimate_signs(model, halves, recipe.loss, engine="hooks", progress=False)
    finally:
        model.embeddings.word_embeddings.weight.requires_grad_(True)
    assert "embeddings.word_embeddings.weight" not in votes.counts
    for name, counts in expected.items():
        assert torch.equal(votes.counts[name].long(), counts), name


def test_gpt2_conv1d_layers_fall_back_to_the_loop(tmp_path) -> None:
    folder = make_tiny_gpt2(tmp_path / "gpt2", seed=0)
    model, recipe = load_recipe("causal-lm", folder, [])
    model.double()
    batch = recipe.collate(topic_examples(2, seed=1))
    expected = _brute_force_counts(model, batch, recipe.loss)
    votes = estimate_signs(model, [batch], recipe.loss, engine="auto", progress=False)
    for name, counts in expected.items():
        assert torch.equal(votes.counts[name].long(), counts), name


class _SharedUse(nn.Module):
    """A linear layer whose weight is also used outside the layer's own call."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inner(x)) - 3 * x @ self.inner.weight.T  # a second, direct use of the weight
        return self.out(h)


def _loss(model, batch):
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def test_auto_detects_parameters_used_outside_their_module() -> None:
    model = _SharedUse().double()
    g = torch.Generator().manual_seed(0)
    batch = {
        "x": torch.randn(12, 4, generator=g, dtype=torch.float64),
        "y": torch.randint(0, 3, (12,), generator=g),
    }
    expected = _brute_force_counts(model, batch, _loss)
    auto = estimate_signs(model, [batch, batch], _loss, engine="auto", progress=False)
    for name, counts in expected.items():
        assert torch.equal(auto.counts[name].long(), 2 * counts), name
    hooks_only = estimate_signs(model, [batch], _loss, engine="hooks", progress=False)
    assert not torch.equal(hooks_only.counts["inner.weight"].long(), expected["inner.weight"])


def test_outside_use_names_only_parameters_used_outside_their_module() -> None:
    model = _SharedUse().double()
    covered = hooked_parameters(model, dict(model.named_parameters()))
    x = torch.randn(5, 4, dtype=torch.float64)
    with outside_use(covered) as found:
        model(x)
    assert found == {"inner.weight"}  # inner.bias and out.* are used only inside their modules
    plain = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    with outside_use(hooked_parameters(plain, dict(plain.named_parameters()))) as found:
        plain(x)
    assert found == set()


class _TwoBranches(nn.Module):
    """An embedding branch and a branch from an input that needs its own gradient (no embedding)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 4)
        self.side = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.out(torch.tanh(self.embed(batch["ids"]).mean(dim=1) + self.side(batch["x"])))


def test_outputs_off_the_embedding_paths_get_their_votes_from_a_second_backward() -> None:
    model = _TwoBranches().double()
    g = torch.Generator().manual_seed(1)
    # an input that needs its gradient makes ``side``'s output reachable without the embedding
    x = torch.randn(9, 4, generator=g, dtype=torch.float64).requires_grad_()
    batch = {
        "ids": torch.randint(0, 10, (9, 5), generator=g),
        "x": x,
        "y": torch.randint(0, 3, (9,), generator=g),
    }

    def loss(m: nn.Module, b: dict) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b), b["y"], reduction="none")

    expected = _brute_force_counts(model, batch, loss)
    votes = estimate_signs(model, [batch], loss, engine="hooks", progress=False)
    assert set(expected) == {"embed.weight", "side.weight", "side.bias", "out.weight", "out.bias"}
    for name, counts in expected.items():
        assert torch.equal(votes.counts[name].long(), counts), name
    assert x.grad is None  # the engine's backward leaves the user's tensors alone


def test_a_loss_that_ignores_the_covered_modules_casts_no_vote() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    batch = {"x": torch.randn(4, 3)}

    def loss(m: nn.Module, b: dict) -> torch.Tensor:
        m(b["x"])  # the layer runs, but the loss does not use it
        return b["x"].sum(dim=1) * 0

    votes = estimate_signs(model, [batch], loss, engine="hooks", progress=False)
    assert all(int(c.abs().sum()) == 0 for c in votes.counts.values())
    assert votes.untouched() == ["0.weight", "0.bias"]
