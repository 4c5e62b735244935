"""Sign votes: exact agreement with a brute-force loop of one backward pass per sample."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradfix import GradfixError, SignVotes, estimate_signs
from gradfix.ops.signs import count_dtype


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).double()


def _data(n: int = 20, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(n, 6, generator=g, dtype=torch.float64),
        "y": torch.randint(0, 4, (n,), generator=g),
    }


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def _batches(data: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    n = data["y"].shape[0]
    return [{k: v[i : i + size] for k, v in data.items()} for i in range(0, n, size)]


def _brute_force(model: nn.Module, data: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """One backward pass per sample, sign of the anti-gradient summed by hand."""
    counts = {
        n: torch.zeros_like(p, dtype=torch.int64) for n, p in model.named_parameters() if p.requires_grad
    }
    grad_sum = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    for i in range(data["y"].shape[0]):
        model.zero_grad()
        _loss(model, {"x": data["x"][i : i + 1], "y": data["y"][i : i + 1]}).sum().backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                counts[n] += torch.sign(-p.grad).long()
                grad_sum[n] += p.grad
    model.zero_grad()
    return counts, grad_sum


@pytest.mark.parametrize("engine", ["loop", "vmap", "hooks", "auto"])
@pytest.mark.parametrize("batch", [1, 7, 20])
def test_majority_votes_equal_brute_force(engine: str, batch: int) -> None:
    model, data = _mlp(), _data()
    expected, grad_sum = _brute_force(model, data)
    votes = estimate_signs(model, _batches(data, batch), _loss, engine=engine, chunk_size=3, progress=False)
    assert votes.num_samples == 20
    assert set(votes.counts) == set(expected)
    for name, counts in expected.items():
        assert votes.counts[name].dtype == torch.int8
        assert torch.equal(votes.counts[name].long(), counts), name
        assert torch.equal(votes.sign()[name], torch.sign(counts).to(torch.int8)), name
        torch.testing.assert_close(votes.grad_sum[name], grad_sum[name])


def test_mean_estimator_is_sign_of_summed_gradient() -> None:
    model, data = _mlp(), _data()
    _, grad_sum = _brute_force(model, data)
    votes = estimate_signs(model, _batches(data, 8), _loss, estimator="mean", progress=False)
    assert votes.counts == {}
    for name, g in grad_sum.items():
        assert torch.equal(votes.sign()[name], torch.sign(-g).to(torch.int8))
        torch.testing.assert_close(votes.mean_gradient()[name], g / 20)


def test_votes_differ_between_estimators() -> None:
    """Majority and mean are different estimators: on some coordinate they must disagree."""
    model, data = _mlp(), _data(n=9)
    votes = estimate_signs(model, [data], _loss, progress=False)
    majority, mean = votes.sign(), votes.with_estimator("mean").sign()
    assert any(not torch.equal(majority[n], mean[n]) for n in majority)


def test_only_trainable_parameters_vote_and_unused_ones_are_untouched() -> None:
    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()
            self.unused = nn.Linear(2, 2).double()  # a parameter the loss never reaches

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    model = WithSpare()
    model.net[0].bias.requires_grad_(False)
    for engine in ("loop", "vmap"):
        votes = estimate_signs(model, [_data()], _loss, engine=engine, progress=False)
        assert "net.0.bias" not in votes.counts
        assert votes.untouched() == ["unused.weight", "unused.bias"]
        assert int(votes.counts["unused.weight"].abs().sum()) == 0


def test_votes_add_up_like_one_vote_over_all_samples() -> None:
    model, data = _mlp(), _data(n=40)
    whole = estimate_signs(model, [data], _loss, progress=False)
    halves = [estimate_signs(model, [b], _loss, progress=False) for b in _batches(data, 20)]
    total = halves[0] + halves[1]
    assert total.num_samples == 40
    for name in whole.counts:
        assert torch.equal(total.counts[name], whole.counts[name])
        torch.testing.assert_close(total.grad_sum[name], whole.grad_sum[name])


def test_counter_dtype_grows_with_samples() -> None:
    assert count_dtype(127) == torch.int8
    assert count_dtype(128) == torch.int16
    assert count_dtype(40000) == torch.int32
    model = nn.Linear(3, 2).double()
    big = {"x": torch.randn(130, 6, dtype=torch.float64)[:, :3], "y": torch.randint(0, 2, (130,))}
    votes = estimate_signs(model, [big], _loss, engine="loop", progress=False)
    assert votes.counts["weight"].dtype == torch.int16


def test_model_weights_and_mode_are_unchanged() -> None:
    model = _mlp()
    model.train()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    estimate_signs(model, [_data()], _loss, progress=False)
    assert model.training
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n])
    assert all(p.grad is None for p in model.parameters())


def test_save_and_load_round_trip(tmp_path) -> None:
    votes = estimate_signs(_mlp(), [_data()], _loss, progress=False)
    path = votes.save(tmp_path / "votes.safetensors")
    loaded = SignVotes.load(path)
    assert loaded.num_samples == votes.num_samples and loaded.estimator == votes.estimator
    assert loaded.hits == votes.hits
    for name in votes.counts:
        assert torch.equal(loaded.counts[name], votes.counts[name])
        assert torch.equal(loaded.grad_sum[name], votes.grad_sum[name])


def test_scalar_loss_is_refused_with_a_clear_error() -> None:
    def mean_loss(model, batch):
        return _loss(model, batch).mean()

    with pytest.raises(GradfixError, match="per-sample losses"):
        estimate_signs(_mlp(), [_data()], mean_loss, engine="loop", progress=False)


def test_empty_batches_are_an_error() -> None:
    with pytest.raises(GradfixError, match="no samples"):
        estimate_signs(_mlp(), [], _loss, progress=False)


def test_counters_widen_past_int16() -> None:
    """33,000 samples: the int16 running counters must widen before they overflow."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(33000, 3, generator=g, dtype=torch.float64)
    y = torch.zeros(33000, dtype=torch.long)  # every sample pushes the same way: counts reach ±33,000
    data = [{"x": x[:20000], "y": y[:20000]}, {"x": x[20000:], "y": y[20000:]}]
    votes = estimate_signs(model, data, _loss, engine="hooks", progress=False)
    assert votes.counts["bias"].dtype == torch.int32
    assert votes.counts["bias"].tolist() == [33000, -33000]
