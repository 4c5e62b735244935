"""T5's layer norm in the hooks engine (a rule registered by class name), and calls that are
shared over the batch although their first axis is as long as the batch."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from torch import nn

from gradfix import estimate_signs
from gradfix.votes.hooks import hooked_parameters
from gradfix.votes.layers import LAYER_RULES, covering_rule, register_layer_rule, rule_for, type_path
from gradfix.votes.layers.t5_layer_norm import T5_LAYER_NORMS, t5_layer_norm_sums

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 6  # samples in a batch, and tokens of each sample


def _loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def _batch(tokens: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    shape = (SIZE, 5) if tokens is None else (SIZE, tokens, 5)
    return {
        "x": torch.randn(*shape, generator=g, dtype=torch.float64),
        "y": torch.randint(0, 3, (SIZE,), generator=g),
    }


def _assert_engines_equal_loop(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> None:
    loop = estimate_signs(model, [batch], _loss, engine="loop", progress=False)
    for engine in ("hooks", "auto"):
        votes = estimate_signs(model, [batch], _loss, engine=engine, progress=False)
        for name, counts in loop.counts.items():
            assert torch.equal(votes.counts[name], counts), (engine, name)
            torch.testing.assert_close(votes.grad_sum[name], loop.grad_sum[name])
        assert votes.hits == loop.hits


def _covered(model: nn.Module) -> set[str]:
    found = hooked_parameters(model, dict(model.named_parameters()))
    return {n for names in found.values() for n in names.values()}


def test_the_t5_family_is_registered_by_name() -> None:
    from transformers.models.mt5.modeling_mt5 import MT5LayerNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    assert "transformers.models.t5.modeling_t5.T5LayerNorm" in T5_LAYER_NORMS
    assert set(T5_LAYER_NORMS) <= set(LAYER_RULES)  # by name: registering imported nothing
    for cls in (T5LayerNorm, MT5LayerNorm):
        rule = rule_for(cls(4))
        assert rule is not None and rule.sums is t5_layer_norm_sums
        assert rule.module_type == type_path(cls) and rule.parameters == ("weight",)
        assert covering_rule(cls(4)) is rule
    odd = T5LayerNorm(4)
    del odd.variance_epsilon  # not what T5's forward reads: the loop computes it
    assert covering_rule(odd) is None


def test_a_dotted_name_is_checked_when_registering() -> None:
    with pytest.raises(TypeError, match="not an import path"):
        register_layer_rule("T5LayerNorm")(t5_layer_norm_sums)


class _TokenMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_t5_layer_norm_votes_equal_the_loop(dtype: torch.dtype) -> None:
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    torch.manual_seed(0)
    norm = T5LayerNorm(6)
    model = nn.Sequential(nn.Linear(5, 6), norm, nn.Tanh(), _TokenMean(), nn.Linear(6, 3)).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-1.0, 2.0, 6))  # not all ones: signs depend on γ
    assert "1.weight" in _covered(model)
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _batch(tokens=4).items()}
    _assert_engines_equal_loop(model, batch)


class _SharedGrid(nn.Module):
    """Adds a bias looked up for each token position, once for the whole batch (like T5's relative
    attention bias): the lookup's first axis is the tokens, not the samples."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Embedding(SIZE, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1])
        return self.head((x + self.bias(positions)).tanh().mean(dim=1))


def test_a_lookup_shared_over_the_batch_goes_to_the_loop_even_when_its_length_is_the_batch() -> None:
    torch.manual_seed(0)
    model = _SharedGrid().double()
    assert "bias.weight" in _covered(model)  # by type; only the call shows it is shared
    batch = _batch(tokens=SIZE)  # as many tokens as samples: the lookup looks per-sample
    _assert_engines_equal_loop(model, batch)
    _assert_engines_equal_loop(model, _batch(tokens=SIZE - 2))  # a plainly shared call
