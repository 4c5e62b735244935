"""Task vectors, transport, oracle references and the first-order descent guarantee."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradfix import (
    GradfixError,
    MismatchError,
    TaskVector,
    descent_report,
    estimate_signs,
    mask_task_vector,
    random_task_vector,
    sign_agreement,
    transport,
)


def _sd(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "enc.weight": torch.randn(4, 3, generator=g) * scale,
        "enc.bias": torch.randn(4, generator=g) * scale,
        "head.weight": torch.randn(2, 4, generator=g) * scale,
        "steps": torch.tensor([seed]),
    }


def test_task_vector_from_state_dicts_arithmetic_and_filters() -> None:
    base, ft, ft2 = _sd(0), _sd(1), _sd(2)
    tau = TaskVector.from_state_dicts(base, ft)
    assert set(tau) == {"enc.weight", "enc.bias", "head.weight"}  # integer buffer skipped
    torch.testing.assert_close(tau["enc.weight"], ft["enc.weight"] - base["enc.weight"])
    tau2 = TaskVector.from_state_dicts(base, ft2)
    total = sum([tau, tau2])
    torch.testing.assert_close(total["enc.bias"], tau["enc.bias"] + tau2["enc.bias"])
    torch.testing.assert_close((tau - tau2)["head.weight"], tau["head.weight"] - tau2["head.weight"])
    torch.testing.assert_close((0.5 * tau)["enc.bias"], tau["enc.bias"] / 2)
    torch.testing.assert_close((-tau)["enc.bias"], -tau["enc.bias"])
    assert set(TaskVector.from_state_dicts(base, ft, include="enc.*")) == {"enc.weight", "enc.bias"}
    assert set(tau.filter(exclude=["*.bias"])) == {"enc.weight", "head.weight"}
    applied = tau.apply_to(base, alpha=1.0)
    torch.testing.assert_close(applied["enc.weight"], ft["enc.weight"])
    assert applied["steps"] is base["steps"]


def test_half_precision_is_computed_in_fp32_and_returned_in_input_dtype() -> None:
    base = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    ft = {"w": torch.tensor([1.5, 1.0], dtype=torch.bfloat16)}
    tau = TaskVector.from_state_dicts(base, ft)
    assert tau["w"].dtype == torch.float32
    out = tau.apply_to(base, 2.0)
    assert out["w"].dtype == torch.bfloat16 and out["w"].tolist() == [2.0, 0.0]


def test_mismatch_error_lists_every_difference() -> None:
    base = _sd(0)
    ft = dict(_sd(1))
    ft["enc.weight"] = torch.zeros(5, 3)
    ft["extra"] = torch.zeros(1)
    del ft["head.weight"]
    base2 = dict(base)
    base2["extra"] = torch.zeros(1)
    with pytest.raises(MismatchError) as err:
        TaskVector.from_state_dicts(base, ft)
    message = str(err.value)
    assert "enc.weight: shapes differ" in message and "[5, 3]" in message and "[4, 3]" in message
    assert "extra: missing in base" in message
    with pytest.raises(MismatchError, match=r"head\.weight"):
        tau = TaskVector.from_state_dicts(_sd(0), _sd(1))
        tau.apply_to({"enc.weight": torch.zeros(4, 3), "enc.bias": torch.zeros(4)})


def test_save_load_round_trip(tmp_path) -> None:
    tau = TaskVector.from_state_dicts(_sd(0), _sd(1))
    loaded = TaskVector.load(tau.save(tmp_path / "tau.safetensors", metadata={"task": "demo"}))
    assert set(loaded) == set(tau)
    for name in tau:
        assert torch.equal(loaded[name], tau[name])


def test_oracle_transport_and_naive_transport() -> None:
    theta_b = _sd(5)
    tau_a = TaskVector.from_state_dicts(_sd(0), _sd(1))
    tau_b = TaskVector.from_state_dicts(_sd(0), _sd(3))
    out = transport(theta_b, tau_a, tau_b, alpha=0.5, mask="agreement")
    for name in tau_a:
        keep = (torch.sign(tau_a[name]) == torch.sign(tau_b[name])).float()
        torch.testing.assert_close(out[name], theta_b[name] + 0.5 * keep * tau_a[name])
    naive = transport(theta_b, tau_a, None, alpha=1.0, mask="none")
    torch.testing.assert_close(naive["enc.bias"], theta_b["enc.bias"] + tau_a["enc.bias"])
    forced = mask_task_vector(tau_a, tau_b, "forcing")
    assert all(torch.equal(torch.sign(forced[n]), torch.sign(tau_b[n])) for n in tau_a)


def test_random_mask_is_seeded_per_tensor() -> None:
    tau = TaskVector.from_state_dicts(_sd(0), _sd(1))
    ref = {n: torch.ones_like(t, dtype=torch.int8) for n, t in tau.items()}
    a = mask_task_vector(tau, ref, "random", seed=1)
    b = mask_task_vector(tau.filter(include="enc.weight"), ref, "random", seed=1)
    assert torch.equal(a["enc.weight"], b["enc.weight"])
    assert not torch.equal(a["enc.weight"], mask_task_vector(tau, ref, "random", seed=2)["enc.weight"])


def test_random_task_vector_matches_moments() -> None:
    tau = TaskVector({"w": torch.randn(200, 50) * 0.3 + 0.1})
    noise = random_task_vector(tau, seed=0)
    assert abs(float(noise["w"].mean()) - 0.1) < 0.02 and abs(float(noise["w"].std()) - 0.3) < 0.02


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3))
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(self.body(x.double()))


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def _full_loss(model: nn.Module, data: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(_loss(model, data).mean())


def test_descent_inequality_with_exact_gradient_signs() -> None:
    """With the exact gradient sign, every kept coordinate descends: ⟨g, m⊙τ⟩ = −Σ m|g||τ| ≤ 0."""
    model = _Net().double()
    g = torch.Generator().manual_seed(0)
    data = {
        "x": torch.randn(64, 5, generator=g, dtype=torch.float64),
        "y": torch.randint(0, 3, (64,), generator=g),
    }
    votes = estimate_signs(model, [data], _loss, estimator="mean", progress=False)
    tau = TaskVector(
        {
            n: torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.05
            for n, p in model.named_parameters()
            if p.requires_grad
        }
    )
    masked = mask_task_vector(tau, votes, "agreement")
    grad = votes.mean_gradient()
    report = descent_report(votes, masked, source=tau, alpha=1.0)
    expected = -sum(float(((masked[n] != 0) * grad[n].abs() * tau[n].abs()).sum()) for n in tau)
    assert report.total_inner == pytest.approx(expected, rel=1e-9)
    assert report.total_inner < 0
    assert all(row.inner <= 0 for row in report.tensors)
    assert 0.3 < report.kept_fraction < 0.7 and report.flipped_fraction == 0
    # the first-order prediction matches the real change of the loss for a small step
    base_loss = _full_loss(model, data)
    eps = 1e-4
    model.load_state_dict(masked.apply_to(model.state_dict(), eps))
    actual = _full_loss(model, data) - base_loss
    assert actual < 0
    assert actual == pytest.approx(eps * report.total_inner, rel=1e-2)
    # the naive update has no such guarantee: here its first-order change is larger
    assert descent_report(votes, tau).total_inner > report.total_inner


def test_unvoted_tensors_error_drop_or_keep() -> None:
    model = _Net().double()
    data = {"x": torch.randn(8, 5, dtype=torch.float64), "y": torch.randint(0, 3, (8,))}
    votes = estimate_signs(model, [data], _loss, progress=False)
    tau = TaskVector({n: torch.full(p.shape, 0.1, dtype=torch.float64) for n, p in model.named_parameters()})
    with pytest.raises(GradfixError, match=r"frozen\.weight"):
        mask_task_vector(tau, votes)
    dropped = mask_task_vector(tau, votes, unvoted="drop")
    assert int(dropped["frozen.weight"].count_nonzero()) == 0
    kept = mask_task_vector(tau, votes, unvoted="keep")
    assert torch.equal(kept["frozen.weight"], tau["frozen.weight"])
    zero_frozen = TaskVector(
        {
            **tau,
            "frozen.weight": torch.zeros(3, 3, dtype=torch.float64),
            "frozen.bias": torch.zeros(3, dtype=torch.float64),
        }
    )
    mask_task_vector(zero_frozen, votes)  # an all-zero tensor needs no votes


def test_sign_agreement() -> None:
    a = {"w": torch.tensor([1.0, -1.0, 2.0, 0.0])}
    b = {"w": torch.tensor([3.0, 1.0, 1.0, 5.0])}
    assert sign_agreement(a, b) == {"w": pytest.approx(2 / 3)}


def test_gate_from_votes_uses_the_vote_margin() -> None:
    from gradfix import SignVotes

    tau = TaskVector({"w": torch.tensor([0.5, -0.2, 0.3, 0.1])})
    votes = SignVotes(
        {"w": torch.tensor([3, 1, -1, -5], dtype=torch.int8)}, {"w": torch.zeros(4)}, 5, hits={"w": 5}
    )
    # margins v/n = [0.6, 0.2, −0.2, −1.0]; opposition = [−0.6, 0.2, 0.2, 1.0]
    assert mask_task_vector(tau, votes, "gate", threshold=0.0)["w"].tolist() == pytest.approx([0.5, 0, 0, 0])
    assert mask_task_vector(tau, votes, "gate", threshold=0.5)["w"].tolist() == pytest.approx(
        [0.5, -0.2, 0.3, 0.0]
    )
    assert torch.equal(
        mask_task_vector(tau, votes, "gate", threshold=0.0)["w"], mask_task_vector(tau, votes)["w"]
    )


def test_tensorwise_mask_uses_the_mean_anti_gradient_for_the_tensor_and_the_votes_for_the_mask() -> None:
    from gradfix import SignVotes

    tau = TaskVector({"a": torch.tensor([0.5, 0.1, -0.1, -0.4]), "b": torch.tensor([0.5, 0.4, -0.3, 0.2])})
    # majority votes ŝ = sign(counts); mean gradient ḡ = grad_sum / 4, the reference is −ḡ
    counts = {
        "a": torch.tensor([4, -2, 2, -4], dtype=torch.int8),
        "b": torch.tensor([2, 2, 2, -2], dtype=torch.int8),
    }
    grad_sum = {
        "a": -4 * torch.tensor([1.0, -0.2, 0.3, -1.0]),  # ⟨−ḡ, τ⟩ = 0.85 > 0: "a" is kept whole
        "b": -4 * torch.tensor([0.1, -1.0, 0.5, -1.0]),  # ⟨−ḡ, τ⟩ = −0.7 < 0: "b" is masked by ŝ
    }
    votes = SignVotes(counts, grad_sum, 4, hits={"a": 4, "b": 4})
    out = mask_task_vector(tau, votes, "tensorwise")
    assert torch.equal(out["a"], tau["a"])
    # the mask of "b" comes from the majority sign [1, 1, 1, −1] (not from sign(−ḡ) = [1, −1, 1, −1])
    assert out["b"].tolist() == pytest.approx([0.5, 0.4, 0.0, 0.0])
    assert torch.equal(out["b"], mask_task_vector(tau, votes, "agreement")["b"])

    # an oracle task vector τ_B is its own real-valued reference
    tau_b = TaskVector({"a": torch.tensor([1.0, -0.2, 0.3, -1.0]), "b": torch.tensor([0.1, -1.0, 0.5, -1.0])})
    oracle = mask_task_vector(tau, tau_b, "tensorwise")
    assert torch.equal(oracle["a"], tau["a"])
    assert oracle["b"].tolist() == pytest.approx([0.5, 0.0, 0.0, 0.0])
    assert torch.equal(
        transport({"a": torch.zeros(4), "b": torch.zeros(4)}, tau, tau_b, 2.0, "tensorwise")["b"],
        2 * oracle["b"],
    )
