"""Per-layer rules of the hooks engine, registered by module type."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from torch import nn

from gradfix import estimate_signs
from gradfix.votes.hooks import hooked_parameters
from gradfix.votes.layers import (
    LAYER_RULES,
    covering_rule,
    module_sums,
    register_layer_rule,
    rule_for,
)
from gradfix.votes.layers.embedding import embedding_sums
from gradfix.votes.layers.layer_norm import layer_norm_sums
from gradfix.votes.layers.linear import linear_sums


class _SameLinear(nn.Linear):
    """A subclass that keeps ``nn.Linear.forward`` (like torch's ``NonDynamicallyQuantizableLinear``)."""


class _ScaledLinear(nn.Linear):
    """A subclass whose ``forward`` computes something else than ``nn.Linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, 2 * self.weight, self.bias)


class _Scale(nn.Module):
    """``y = x ⊙ w``: a layer type with no built-in rule."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-1.0, 2.0, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


@pytest.fixture
def registry():
    """The rule registry, restored after the test."""
    saved = dict(LAYER_RULES)
    yield LAYER_RULES
    LAYER_RULES.clear()
    LAYER_RULES.update(saved)


def _model(middle: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), middle, nn.Tanh(), nn.Linear(6, 3)).double()


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "x": torch.randn(11, 5, generator=g, dtype=torch.float64),
        "y": torch.randint(0, 3, (11,), generator=g),
    }


def _loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def _covered(model: nn.Module) -> set[str]:
    return {
        n
        for names in hooked_parameters(model, dict(model.named_parameters())).values()
        for n in names.values()
    }


def _assert_hooks_equal_loop(model: nn.Module) -> None:
    batch = _batch()
    loop = estimate_signs(model, [batch], _loss, engine="loop", progress=False)
    hooks = estimate_signs(model, [batch], _loss, engine="hooks", progress=False)
    assert set(hooks.counts) == set(loop.counts)
    for name, counts in loop.counts.items():
        assert torch.equal(hooks.counts[name], counts), name
        torch.testing.assert_close(hooks.grad_sum[name], loop.grad_sum[name])
    assert hooks.hits == loop.hits


def test_each_built_in_layer_type_has_its_rule() -> None:
    assert rule_for(nn.Linear(2, 3)).sums is linear_sums
    assert rule_for(nn.LayerNorm(4)).sums is layer_norm_sums
    assert rule_for(nn.Embedding(5, 2)).sums is embedding_sums
    assert rule_for(nn.Embedding).parameters == ("weight",)
    assert rule_for(nn.Conv1d(2, 2, 1)) is None
    assert rule_for(nn.Tanh()) is None


def test_lookup_walks_the_mro_but_only_registered_classes_are_covered() -> None:
    same, scaled = _SameLinear(3, 2), _ScaledLinear(3, 2)
    assert rule_for(same) is LAYER_RULES[nn.Linear]
    assert rule_for(_SameLinear) is LAYER_RULES[nn.Linear]
    assert covering_rule(same) is None  # a subclass may have its weight used outside its forward
    assert rule_for(scaled) is LAYER_RULES[nn.Linear]
    assert covering_rule(scaled) is None
    attention = nn.MultiheadAttention(4, 2)
    assert covering_rule(attention.out_proj) is None  # its weight is used by the attention module
    patched = nn.Linear(3, 2)
    patched.forward = lambda x: x  # an instance whose forward was replaced
    assert covering_rule(patched) is None
    assert covering_rule(nn.Embedding(5, 2, max_norm=1.0)) is None
    assert covering_rule(nn.Embedding(5, 2, sparse=True)) is None


def test_a_subclass_goes_to_the_loop_until_its_class_is_registered(registry) -> None:
    model = _model(_SameLinear(6, 6))
    assert not {"1.weight", "1.bias"} & _covered(model)
    _assert_hooks_equal_loop(model)
    register_layer_rule(_SameLinear)(linear_sums)
    assert {"1.weight", "1.bias"} <= _covered(model)
    _assert_hooks_equal_loop(model)


def test_a_subclass_changing_forward_falls_back_to_the_loop() -> None:
    model = _model(_ScaledLinear(6, 6))
    assert _covered(model) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    _assert_hooks_equal_loop(model)


def test_an_unregistered_module_type_falls_back_to_the_loop() -> None:
    model = _model(_Scale(6))
    assert rule_for(model[1]) is None
    assert "1.weight" not in _covered(model)
    _assert_hooks_equal_loop(model)


def test_a_rule_registered_for_a_new_type_is_used_by_the_hooks_engine(registry) -> None:
    used: list[int] = []

    @register_layer_rule(_Scale, parameters=("weight",))
    def scale_sums(module, calls, names, sink, ws) -> None:
        """``∂ℓ_b/∂w = Σ_t δ_{b,t} ⊙ x_{b,t}``, summed over calls."""
        used.append(len(calls))
        total = None
        for x, g in calls:
            per_sample = (g * x).reshape(g.shape[0], -1, g.shape[-1]).sum(dim=1)
            total = per_sample if total is None else total + per_sample
        sink.add_per_sample(names["weight"], total)

    assert registry[_Scale].sums is scale_sums
    model = _model(_Scale(6))
    assert rule_for(model[1]) is registry[_Scale]
    assert "1.weight" in _covered(model)
    _assert_hooks_equal_loop(model)
    assert used == [1]  # one batch, one call


def test_registering_checks_its_types_and_dispatch_needs_a_rule(registry) -> None:
    with pytest.raises(TypeError, match="at least one"):
        register_layer_rule()
    with pytest.raises(TypeError, match=r"not an nn\.Module subclass"):
        register_layer_rule(int)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="no per-layer rule is registered for _Scale"):
        module_sums(_Scale(2), [], {}, None, None)  # type: ignore[arg-type]
