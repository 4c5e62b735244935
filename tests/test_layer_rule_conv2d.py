"""The hooks engine's rules for ``nn.Conv2d`` and for rules registered by import path."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from torch import nn

from gradfix import estimate_signs
from gradfix.votes.hooks import hooked_parameters
from gradfix.votes.layers import LAYER_RULES, covering_rule, register_layer_rule, rule_for, type_path
from gradfix.votes.layers.conv2d import conv2d_sums
from gradfix.votes.layers.linear import linear_sums


class _Twice(nn.Module):
    """The same convolution applied to an image and to its mirror image (two calls per batch)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.conv(x.flip(-1)).flip(-1)


def _votes_equal(model: nn.Module, channels: int, engine: str = "hooks") -> None:
    """Votes of ``model`` (a conv net) by ``engine`` equal those of the loop, on 7 random images."""
    generator = torch.Generator().manual_seed(5)
    batch = {
        "x": torch.randn(7, channels, 6, 6, generator=generator, dtype=torch.float64),
        "y": torch.randint(0, 3, (7,), generator=generator),
    }

    def loss(m: nn.Module, b: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b["x"]), b["y"], reduction="none")

    loop = estimate_signs(model, [batch], loss, engine="loop", progress=False)
    votes = estimate_signs(model, [batch], loss, engine=engine, progress=False)
    assert votes.hits == loop.hits
    for name, counts in loop.counts.items():
        assert torch.equal(votes.counts[name], counts), name
        torch.testing.assert_close(votes.grad_sum[name], loop.grad_sum[name])


def _net(conv: nn.Module, channels: int) -> nn.Module:
    torch.manual_seed(0)
    out = conv(torch.zeros(1, channels, 6, 6)).numel()
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(out, 3)).double()


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, 2, stride=2),  # a ViT's patch embedding
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
        nn.Conv2d(3, 4, 3, padding="valid"),
    ],
    ids=["patches", "padded", "strided-dilated", "valid"],
)
def test_conv2d_votes_equal_the_loop(conv: nn.Conv2d) -> None:
    assert covering_rule(conv).sums is conv2d_sums
    model = _net(conv, 3)
    covered = {
        n
        for names in hooked_parameters(model, dict(model.named_parameters())).values()
        for n in names.values()
    }
    assert {n for n, _ in conv.named_parameters(prefix="0")} <= covered
    _votes_equal(model, 3)


def test_a_conv_called_twice_sums_its_calls() -> None:
    model = _net(_Twice(nn.Conv2d(3, 4, 3, padding=1)), 3)
    _votes_equal(model, 3)
    _votes_equal(model, 3, engine="auto")


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 4, 3, groups=2),
        nn.Conv2d(3, 4, 3, padding="same"),
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
    ],
)
def test_convolutions_the_rule_cannot_unfold_go_to_the_loop(conv: nn.Conv2d) -> None:
    assert rule_for(conv).sums is conv2d_sums
    assert covering_rule(conv) is None
    _votes_equal(_net(conv, conv.in_channels), conv.in_channels)


def test_a_rule_registered_by_import_path_covers_that_class() -> None:
    class _Local(nn.Linear):
        """A subclass that keeps ``nn.Linear.forward``, registered below by its import path."""

    saved = dict(LAYER_RULES)
    try:
        assert covering_rule(_Local(2, 3)) is None
        register_layer_rule(type_path(_Local))(linear_sums)
        assert covering_rule(_Local(2, 3)).sums is linear_sums
        with pytest.raises(TypeError, match="not an import path"):
            register_layer_rule("Conv2d")
    finally:
        LAYER_RULES.clear()
        LAYER_RULES.update(saved)
    assert covering_rule(_Local(2, 3)) is None
