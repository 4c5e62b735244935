"""Each mask's formula on hand-made tensors, and the sign estimators."""

from __future__ import annotations

import math

import pytest
import torch

from gradfix.ops import (
    agreement_mask,
    apply_mask,
    consensus_sign,
    magnitude_scaled_mask,
    majority_sign,
    mean_sign,
    random_sign_task_vector,
    sign_forcing,
    sign_votes,
)

TAU = torch.tensor([0.5, -0.2, 0.3, -0.4, 0.0, 0.1])
REF = torch.tensor([1, 1, -1, -1, 1, 0], dtype=torch.int8)


def test_agreement_keeps_only_agreeing_coordinates_and_drops_ties() -> None:
    assert agreement_mask(TAU, REF).tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert apply_mask("agreement", TAU, REF).tolist() == pytest.approx([0.5, 0.0, 0.0, -0.4, 0.0, 0.0])


def test_forcing_gives_magnitudes_the_reference_sign() -> None:
    assert sign_forcing(TAU, REF).tolist() == pytest.approx([0.5, 0.2, -0.3, -0.4, 0.0, 0.0])


def test_magnitude_mask_is_tanh_of_normalised_product_clamped_at_zero() -> None:
    tau = torch.tensor([2.0, -2.0, 1.0, 1.0])
    ref = torch.tensor([4.0, 4.0, -4.0, 0.5])
    t = tau / tau.pow(2).mean().sqrt()
    r = ref / ref.pow(2).mean().sqrt()
    expected = [max(0.0, math.tanh(2.0 * a * b)) for a, b in zip(t.tolist(), r.tolist(), strict=True)]
    got = magnitude_scaled_mask(tau, ref, gamma=2.0)
    assert got.tolist() == pytest.approx(expected)
    assert got[1] == 0 and got[2] == 0 and 0 < got[3] < got[0] < 1


def test_random_signs_keep_magnitudes_and_are_seeded() -> None:
    tau = torch.randn(1000)
    a = random_sign_task_vector(tau, torch.Generator().manual_seed(3))
    b = random_sign_task_vector(tau, torch.Generator().manual_seed(3))
    c = random_sign_task_vector(tau, torch.Generator().manual_seed(4))
    assert torch.equal(a.abs(), tau.abs()) and torch.equal(a, b) and not torch.equal(a, c)
    flipped = (torch.sign(a) != torch.sign(tau)).float().mean()
    assert 0.4 < float(flipped) < 0.6


def test_sign_estimators() -> None:
    grads = torch.tensor([[1.0, -2.0, 0.0, 3.0], [2.0, 1.0, 0.0, -0.5], [-0.1, 1.0, 0.0, -0.5]])
    votes = sign_votes(grads)
    assert votes.dtype == torch.int8
    assert votes.tolist() == [-1, -1, 0, 1]
    assert majority_sign(votes).tolist() == [-1, -1, 0, 1]
    assert mean_sign(grads.sum(0)).tolist() == [-1, 0, 0, -1]
    assert consensus_sign(
        [torch.tensor([1, -1, 1]), torch.tensor([1, 1, -1]), torch.tensor([-1, 1, 0])]
    ).tolist() == [
        1,
        1,
        0,
    ]


def test_unknown_mask_and_shape_errors() -> None:
    with pytest.raises(ValueError, match="unknown mask"):
        apply_mask("nope", TAU, REF)
    with pytest.raises(ValueError, match="shape mismatch"):
        agreement_mask(TAU, REF[:3])


def test_vote_margin_gate_spans_gradfix_and_naive() -> None:
    from gradfix.ops import vote_margin_gate

    tau = torch.tensor([0.5, -0.2, 0.3, -0.4, 0.1, 0.2])
    margin = torch.tensor([0.6, 0.2, -0.2, -1.0, 0.0, -0.6])  # v / n
    # opposition −sign(τ)·μ = [−0.6, 0.2, 0.2, −1.0, 0.0, 0.6]
    assert vote_margin_gate(tau, margin, 0.0).tolist() == agreement_mask(tau, torch.sign(margin)).tolist()
    assert vote_margin_gate(tau, margin, 0.3).tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert vote_margin_gate(tau, margin, 0.1).tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert vote_margin_gate(tau, margin, 1.01).tolist() == [1.0] * 6
    gated = apply_mask("gate", tau, torch.sign(margin), margin, threshold=0.1)
    assert gated.tolist() == pytest.approx([0.5, 0.0, 0.0, -0.4, 0.1, 0.0])


def test_confidence_weight_is_the_share_of_agreeing_votes() -> None:
    from gradfix.ops import confidence_weight

    tau = torch.tensor([0.5, -0.2, 0.3, 0.1])
    margin = torch.tensor([1.0, 0.5, 0.0, -1.0])
    assert confidence_weight(tau, margin).tolist() == pytest.approx([1.0, 0.25, 0.5, 0.0])
    assert apply_mask("confidence", tau, torch.sign(margin), margin).tolist() == pytest.approx(
        [0.5, -0.05, 0.15, 0.0]
    )


def test_tensorwise_keeps_a_descent_tensor_whole_and_masks_the_other() -> None:
    from gradfix.ops.masks import MASKS, descends, tensorwise_mask

    assert "tensorwise" in MASKS
    # ⟨r, τ⟩ = 0.5 − 0.02 − 0.03 + 0.4 = 0.85 > 0: kept whole, the two disagreeing coordinates too
    tau_whole = torch.tensor([0.5, 0.1, -0.1, -0.4])
    r_whole = torch.tensor([1.0, -0.2, 0.3, -1.0])
    # ⟨r, τ⟩ = 0.05 − 0.4 − 0.15 − 0.2 = −0.7 < 0: agreement mask with sign(r) = [1, −1, 1, −1]
    tau_masked = torch.tensor([0.5, 0.4, -0.3, 0.2])
    r_masked = torch.tensor([0.1, -1.0, 0.5, -1.0])
    assert descends(tau_whole, r_whole) and not descends(tau_masked, r_masked)
    assert tensorwise_mask(tau_whole, torch.sign(r_whole), r_whole).tolist() == [1.0] * 4
    assert tensorwise_mask(tau_masked, torch.sign(r_masked), r_masked).tolist() == [1.0, 0.0, 0.0, 0.0]
    kept = apply_mask("tensorwise", tau_whole, torch.sign(r_whole).to(torch.int8), r_whole)
    assert torch.equal(kept, tau_whole)
    masked = apply_mask("tensorwise", tau_masked, torch.sign(r_masked).to(torch.int8), r_masked)
    assert masked.tolist() == pytest.approx([0.5, 0.0, 0.0, 0.0])
    assert torch.equal(masked, apply_mask("agreement", tau_masked, torch.sign(r_masked).to(torch.int8)))
    # a zero inner product is no descent: masked
    assert not descends(torch.tensor([1.0, 1.0]), torch.tensor([1.0, -1.0]))


def test_tensorwise_on_a_slice_follows_the_inner_product_of_the_whole_tensor() -> None:
    tau = torch.tensor([0.5, 0.4, -0.3, 0.2])
    r = torch.tensor([0.1, -1.0, 0.5, -1.0])
    sign = torch.sign(r).to(torch.int8)
    # the first two rows alone: ⟨r, τ⟩ = 0.05 − 0.4 < 0, but the whole tensor's product decides
    head = apply_mask("tensorwise", tau[:2], sign[:2], r[:2], inner=0.3)
    assert torch.equal(head, tau[:2])
    assert apply_mask("tensorwise", tau[:2], sign[:2], r[:2], inner=0.0).tolist() == pytest.approx([0.5, 0.0])
    assert apply_mask("tensorwise", tau[:2], sign[:2], r[:2], inner=-1.0).tolist() == pytest.approx(
        [0.5, 0.0]
    )
