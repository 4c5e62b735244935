"""Majority votes that keep counts only (``gradient="none"``): the same votes, at most 2 bytes per
voting parameter, the mean gradient from one summed backward, and files without gradient sums."""

from __future__ import annotations

import pytest
import torch
from brute_force import brute_force_votes
from torch import nn

from gradfix import ConfigError, SignVotes, estimate_signs
from gradfix.io import open_checkpoint
from gradfix.votes.accumulator import Accumulator
from gradfix.votes.file import read_votes_header
from gradfix.votes.summed import summed_gradients


def _mlp(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def _batches(dtype: torch.dtype, n: int = 21, size: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)
    return [{"x": x[i : i + size], "y": y[i : i + size]} for i in range(0, n, size)]


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def _brute_force(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> tuple[dict, dict]:
    return brute_force_votes(model, batches, _loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("engine", ["loop", "vmap", "hooks", "auto"])
def test_counts_only_votes_are_the_votes_with_sums(dtype: torch.dtype, engine: str) -> None:
    model, batches = _mlp(dtype), _batches(dtype)
    full = estimate_signs(model, batches, _loss, engine=engine, chunk_size=3, progress=False)
    lean = estimate_signs(model, batches, _loss, engine=engine, chunk_size=3, progress=False, gradient="none")
    assert lean.grad_sum == {} and not lean.has_gradient and full.has_gradient
    assert lean.num_samples == full.num_samples == 21 and lean.hits == full.hits
    assert lean.shapes() == full.shapes() and lean.names() == full.names()
    for name, counts in full.counts.items():
        assert lean.counts[name].dtype == torch.int8, name
        assert torch.equal(lean.counts[name], counts), name
    if dtype == torch.float64:  # and they are the brute-force loop's
        expected, _ = _brute_force(model, batches)
        for name, counts in expected.items():
            assert torch.equal(lean.counts[name].long(), counts), name


def test_the_accumulator_holds_two_bytes_per_voting_parameter() -> None:
    params = {"w": torch.zeros(30, 40), "b": torch.zeros(30)}
    lean, full = Accumulator(params, True, with_sums=False), Accumulator(params, True, with_sums=True)
    grads = torch.randn(5, 30, 40)
    for acc in (lean, full):
        acc.add_per_sample("w", grads)
        acc.add_linear("b", torch.randn(5, 1, 1), torch.randn(5, 1, 30))  # refused shape: no state
        acc.add_per_sample("b", grads[:, :, 0])
        acc.n = 5
    assert lean.state_bytes() == 2 * 1230 and full.state_bytes() == 6 * 1230
    assert torch.equal(lean.counts["w"], full.counts["w"]) and lean.hits == full.hits
    counts, sums = lean.result("majority")
    assert sums == {} and counts["w"].dtype == torch.int8
    assert torch.equal(counts["w"].long(), -torch.sign(grads).sum(dim=0).long())


def test_summed_gradients_hand_over_each_tensor_and_leave_grad_alone() -> None:
    model, batches = _mlp(torch.float64), _batches(torch.float64)
    _, expected = _brute_force(model, batches)
    first = next(model.parameters())
    first.grad = torch.ones_like(first)
    got: dict[str, torch.Tensor] = {}
    calls: list[str] = []

    def consume(name: str, grad: torch.Tensor) -> None:
        calls.append(name)
        got[name] = got.get(name, torch.zeros_like(grad)) + grad

    assert summed_gradients(model, batches, _loss, consume) == 21
    assert len(calls) == 3 * len(expected)  # each tensor once per batch
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g)
    assert torch.equal(first.grad, torch.ones_like(first))
    assert all(p.grad is None for p in list(model.parameters())[1:])


def test_counts_only_votes_add_save_and_refuse_the_mean_gradient(tmp_path) -> None:
    model, batches = _mlp(torch.float32), _batches(torch.float32)
    lean = estimate_signs(model, batches[:2], _loss, progress=False, gradient="none")
    full = estimate_signs(model, batches[2:], _loss, progress=False)
    whole = estimate_signs(model, batches, _loss, progress=False)
    for total in (lean + full, full + lean, full.without_gradient() + lean):
        assert total.grad_sum == {} and total.num_samples == 21
        for name, counts in whole.counts.items():
            assert torch.equal(total.counts[name], counts), name
    with pytest.raises(ConfigError, match="kept no gradient sums"):
        lean.mean_gradient()
    with pytest.raises(ConfigError, match="needs gradient sums"):
        lean.with_estimator("mean")
    with pytest.raises(ConfigError, match="unknown gradient"):
        estimate_signs(model, batches, _loss, progress=False, gradient="half")  # type: ignore[arg-type]
    path = lean.save(tmp_path / "lean.safetensors")
    with open_checkpoint(path) as reader:
        header = read_votes_header(reader, path)
        assert not header.has_gradient and header.has_counts and header.shapes == lean.shapes()
        assert not any(k.startswith("grad_sum/") for k in reader.names())
    loaded = SignVotes.load(path)
    assert loaded.grad_sum == {} and loaded.hits == lean.hits
    assert all(torch.equal(loaded.counts[n], c) for n, c in lean.counts.items())
    old = SignVotes.load(full.save(tmp_path / "full.safetensors"))  # files with sums load as before
    assert old.has_gradient and all(torch.equal(old.grad_sum[n], g) for n, g in full.grad_sum.items())


def test_a_counts_only_file_of_the_mean_estimator_is_refused(tmp_path) -> None:
    from safetensors.torch import save_file

    from gradfix import CheckpointError

    path = tmp_path / "v.safetensors"
    meta = {"gradfix_kind": "gradfix.sign_votes", "num_samples": "3", "estimator": "mean", "hits": "{}"}
    save_file({"counts/w": torch.ones(4, dtype=torch.int8)}, str(path), meta)
    with open_checkpoint(path) as reader, pytest.raises(CheckpointError, match="needs gradient sums"):
        read_votes_header(reader, path)
