"""Registries: a new mask or method is one class, found by the API and listed by the command line."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from gradfix import mask_task_vector
from gradfix.cli.main import build_parser
from gradfix.errors import ConfigError
from gradfix.methods import METHODS, Method, register_method, resolve_method
from gradfix.ops.masks import MASKS, Mask, ReferenceRows, SliceContext, register_mask
from gradfix.registry import Registry
from gradfix.settings import MaskSettings


def test_a_registry_refuses_a_name_twice_and_lists_the_choices() -> None:
    things: Registry[int] = Registry("thing")
    things.register("one", 1)
    with pytest.raises(ValueError, match="'one' is registered twice"):
        things.register("one", 2)
    assert things.lookup("one") == 1 and list(things) == ["one"]
    with pytest.raises(ConfigError, match="unknown thing 'two'; choose one of one"):
        things.lookup("two")
    with pytest.raises(ConfigError, match="unknown thing 3"):
        things.lookup(3)


@pytest.fixture
def halved() -> Iterator[type[Mask]]:
    @register_mask
    class Halved(Mask):
        name = "halved"
        summary = "half of τ_A where its sign agrees with the reference"
        equation = "τ'_i = τ_i / 2 · 1[sign(τ_i) = r_i]"
        reads = "sign"

        def apply(self, tau: Tensor, reference: ReferenceRows, context: SliceContext) -> Tensor:
            return tau / 2 * (torch.sign(tau) == reference.sign).to(tau.dtype)

    yield Halved
    del MASKS["halved"]


def test_a_mask_registered_in_one_class_is_used_by_the_api_and_listed_by_the_cli(halved, capsys) -> None:
    tau = {"w": torch.tensor([1.0, -2.0, 3.0])}
    oracle = {"w": torch.tensor([1.0, 1.0, -1.0])}
    assert mask_task_vector(tau, oracle, "halved")["w"].tolist() == [0.5, 0.0, 0.0]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["transport", "--help"])
    assert "halved" in capsys.readouterr().out


@pytest.fixture
def doubled() -> Iterator[type[Method]]:
    @register_method
    class Doubled(Method):
        name = "doubled"
        summary = "naive addition at twice the given α"
        masks = ("none",)

        def resolve(self, masking: MaskSettings) -> MaskSettings:
            resolved = super().resolve(masking)
            resolved.alpha = 2 * float(resolved.alpha or 0)
            return resolved

    yield Doubled
    del METHODS["doubled"]


def test_a_method_registered_in_one_class_is_resolved_and_listed(doubled, capsys) -> None:
    method, masking = resolve_method("doubled", MaskSettings(alpha=0.5))
    assert method.name == "doubled" and masking.alpha == 1.0 and masking.mask == "none"
    with pytest.raises(ConfigError, match="--method doubled does not take --mask agreement"):
        resolve_method("doubled", MaskSettings(mask="agreement"))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["transport", "--help"])
    assert "naive addition at twice" in " ".join(capsys.readouterr().out.split())
