"""Theseus: Procrustes maps recovered from activations (or weights), within and across widths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradfix import ConfigError, MismatchError, TaskVector
from gradfix.activations import CrossStats, Site, cross_statistics, record_activations
from gradfix.rebasin import PermutationSpec, spec_for_module
from gradfix.theseus import (
    apply_transforms,
    data_free_transforms,
    inverse_power,
    procrustes,
    space_statistics,
    theseus_data_free_task_vector,
    theseus_from_models,
    theseus_task_vector,
    theseus_transforms,
    whitened_cross,
)


def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _signed_permutation(n: int, gen: torch.Generator) -> torch.Tensor:
    signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    return torch.eye(n, dtype=torch.float64)[torch.randperm(n, generator=gen)] * signs


def _embedding(d_a: int, d_b: int, rotation: torch.Tensor) -> torch.Tensor:
    """``T = Eᵀ R`` (``d_A × d_B``): A's space isometrically inside B's, then rotated."""
    return torch.eye(d_a, d_b, dtype=torch.float64) @ rotation


def _mlp(widths: tuple[int, int, int], seed: int, d_in: int = 20) -> nn.Sequential:
    """Linear spaces ``hidden.0`` and ``hidden.2`` (any rotation keeps the function), and a tanh
    space ``hidden.1`` (signed permutations keep it)."""
    torch.manual_seed(seed)
    h0, h1, h2 = widths
    return nn.Sequential(
        nn.Linear(d_in, h0), nn.Linear(h0, h1), nn.Tanh(), nn.Linear(h1, h2), nn.Linear(h2, 5)
    )


def _true_maps(widths_a, widths_b, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "hidden.0": _embedding(widths_a[0], widths_b[0], _orthogonal(widths_b[0], gen)),
        "hidden.1": _embedding(widths_a[1], widths_b[1], _signed_permutation(widths_b[1], gen)),
        "hidden.2": _embedding(widths_a[2], widths_b[2], _orthogonal(widths_b[2], gen)),
    }


def _tau(sd: dict[str, torch.Tensor], seed: int) -> TaskVector:
    gen = torch.Generator().manual_seed(seed)
    return TaskVector({n: 0.01 * torch.randn(t.shape, generator=gen) for n, t in sd.items()})


def _batches(n: int = 4, d_in: int = 20, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(64, d_in, generator=gen) for _ in range(n)]


def _close(found, expected, atol: float = 1e-5) -> None:
    assert set(found) == set(expected)
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], atol=atol, rtol=0, msg=name)


def _rotated_pair(widths=(16, 24, 16), d_in: int = 20):
    model_a = _mlp(widths, seed=0, d_in=d_in)
    spec = spec_for_module(model_a)
    maps = _true_maps(widths, widths, seed=1)
    model_b = _mlp(widths, seed=9, d_in=d_in)
    model_b.load_state_dict(apply_transforms(model_a.state_dict(), maps, spec))
    x = torch.randn(50, d_in)
    torch.testing.assert_close(model_b(x), model_a(x), atol=1e-5, rtol=0)  # same function
    return model_a, model_b, spec, maps


@pytest.mark.parametrize("whiten", [0.0, 0.25, 0.5])
def test_rotated_hidden_spaces_recovered_from_activations(whiten: float) -> None:
    model_a, model_b, spec, maps = _rotated_pair()
    stats = space_statistics(model_a, model_b, _batches(), spec)
    transforms = theseus_transforms(stats, spec, whiten=whiten)
    _close(transforms, maps, atol=1e-6)
    tau_a = _tau(model_a.state_dict(), seed=3)
    tau_b = theseus_task_vector(tau_a, stats, spec, whiten=whiten)
    _close(tau_b, apply_transforms(tau_a, maps, spec))
    assert torch.equal(tau_b["4.bias"], tau_a["4.bias"])  # the output space is not transformed


def test_cross_width_transport_keeps_the_function() -> None:
    widths_a, widths_b = (16, 24, 16), (24, 32, 24)
    model_a = _mlp(widths_a, seed=0)
    spec = spec_for_module(model_a)
    maps = _true_maps(widths_a, widths_b, seed=2)
    sd_b = apply_transforms(model_a.state_dict(), maps, spec)
    gen = torch.Generator().manual_seed(5)
    for module, space in (("1", "hidden.0"), ("3", "hidden.1"), ("4", "hidden.2")):
        # B's own extra weights, reading only the part of its space that A's activations never reach
        t = maps[space]
        complement = torch.eye(t.shape[1], dtype=torch.float64) - t.T @ t
        junk = torch.randn(sd_b[f"{module}.weight"].shape, generator=gen, dtype=torch.float64) @ complement
        sd_b[f"{module}.weight"] = sd_b[f"{module}.weight"] + junk.float()
    model_b = _mlp(widths_b, seed=7)
    model_b.load_state_dict(sd_b)
    x = torch.randn(50, 20)
    torch.testing.assert_close(model_b(x), model_a(x), atol=1e-5, rtol=0)  # B embeds A's function

    tau_a = _tau(model_a.state_dict(), seed=4)
    for whiten in (0.0, 0.5):
        tau_b = theseus_from_models(tau_a, model_a, model_b, _batches(), spec, whiten=whiten)
        assert tau_b.shapes() == {n: tuple(t.shape) for n, t in sd_b.items()}
        _close(tau_b, apply_transforms(tau_a, maps, spec))
        model_a_ft, model_b_ft = _mlp(widths_a, seed=0), _mlp(widths_b, seed=0)
        model_a_ft.load_state_dict(tau_a.apply_to(model_a.state_dict()))
        model_b_ft.load_state_dict(tau_b.apply_to(sd_b))
        torch.testing.assert_close(model_b_ft(x), model_a_ft(x), atol=1e-5, rtol=0)


def test_data_free_recovers_rotation_with_full_rank_weights() -> None:
    model_a, model_b, spec, maps = _rotated_pair(widths=(20, 16, 12), d_in=24)  # widths never grow
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    _close(data_free_transforms(sd_a, sd_b, spec), maps, atol=1e-6)
    tau_a = _tau(sd_a, seed=6)
    tau_b = theseus_data_free_task_vector(tau_a, sd_a, sd_b)
    _close(tau_b, apply_transforms(tau_a, maps, spec))
    _close(theseus_data_free_task_vector(tau_a, sd_a, sd_b, whiten=0.5), tau_b)


def test_data_free_cross_width_gives_target_shapes() -> None:
    sd_a, sd_b = (
        _mlp((20, 16, 12), seed=0, d_in=24).state_dict(),
        _mlp((28, 20, 18), seed=1, d_in=24).state_dict(),
    )
    tau_b = theseus_data_free_task_vector(_tau(sd_a, seed=0), sd_a, sd_b)
    assert tau_b.shapes() == {n: tuple(t.shape) for n, t in sd_b.items()}


def _tiny_bert(seed: int, hidden: int = 32, intermediate: int = 64):
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=40,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=intermediate,
        max_position_embeddings=16,
    )
    torch.manual_seed(seed)
    model = BertModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.02)
            elif "LayerNorm.weight" in name:
                param.uniform_(0.5, 1.5)
    return model


def _permutation_map(perm: torch.Tensor) -> torch.Tensor:
    """``T`` with ``T[p[j], j] = 1``: contracting with it re-indexes like ``index_select(p)``."""
    t = torch.zeros(len(perm), len(perm), dtype=torch.float64)
    t[perm, torch.arange(len(perm))] = 1.0
    return t


def _head_map(sigma: torch.Tensor, head_dim: int, gen: torch.Generator) -> torch.Tensor:
    """Heads permuted by ``σ``, each rotated by its own orthogonal ``R_j``: ``q·k`` per head is kept."""
    n = len(sigma) * head_dim
    t = torch.zeros(n, n, dtype=torch.float64)
    for j, s in enumerate(sigma.tolist()):
        t[s * head_dim : (s + 1) * head_dim, j * head_dim : (j + 1) * head_dim] = _orthogonal(head_dim, gen)
    return t


def test_bert_permuted_and_head_rotated_recovered() -> None:
    model_a = _tiny_bert(0)
    spec = spec_for_module(model_a)
    gen = torch.Generator().manual_seed(1)
    maps = {"residual": _permutation_map(torch.randperm(32, generator=gen))}
    maps["pooler"] = _permutation_map(torch.randperm(32, generator=gen))
    for i in range(2):
        maps[f"layer.{i}.ffn"] = _permutation_map(torch.randperm(64, generator=gen))
        sigma = torch.randperm(4, generator=gen)
        maps[f"layer.{i}.qk"], maps[f"layer.{i}.vo"] = _head_map(sigma, 8, gen), _head_map(sigma, 8, gen)
    model_b = _tiny_bert(5)
    model_b.load_state_dict(apply_transforms(model_a.state_dict(), maps, spec))
    ids = torch.randint(0, 40, (64, 8), generator=gen)
    batches = [{"input_ids": chunk} for chunk in ids.split(16)]
    with torch.no_grad():
        out_a, out_b = model_a(**batches[0]), model_b(**batches[0])
    residual = maps["residual"].argmax(0)
    torch.testing.assert_close(
        out_b.last_hidden_state, out_a.last_hidden_state[..., residual], atol=1e-5, rtol=0
    )

    stats = space_statistics(model_a, model_b, batches, spec)
    tau_a = _tau(model_a.state_dict(), seed=2)
    expected = apply_transforms(tau_a, maps, spec)
    for whiten in (0.0, 0.5):
        _close(theseus_transforms(stats, spec, whiten=whiten), maps, atol=1e-5)
        _close(theseus_task_vector(tau_a, stats, spec, whiten=whiten), expected)
    _close(data_free_transforms(model_a.state_dict(), model_b.state_dict(), spec), maps, atol=1e-5)


def test_bert_cross_width_shapes() -> None:
    model_a, model_b = _tiny_bert(0), _tiny_bert(1, hidden=48, intermediate=96)
    ids = torch.randint(0, 40, (4, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[:, 6:] = 0
    tau_a = _tau(model_a.state_dict(), seed=0)
    tau_b = theseus_from_models(tau_a, model_a, model_b, [{"input_ids": ids, "attention_mask": mask}])
    assert tau_b.shapes() == {n: tuple(t.shape) for n, t in model_b.state_dict().items()}
    t = theseus_transforms(
        space_statistics(model_a, model_b, [{"input_ids": ids}], spec_for_module(model_a)),
        spec_for_module(model_a),
    )
    assert t["layer.0.qk"].shape == (32, 48)
    torch.testing.assert_close(
        t["residual"] @ t["residual"].T, torch.eye(32, dtype=torch.float64), atol=1e-8, rtol=0
    )


def test_math_helpers() -> None:
    gen = torch.Generator().manual_seed(0)
    r = _orthogonal(6, gen)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(procrustes(x.T @ (x @ r)), r)
    g = x.T @ x
    torch.testing.assert_close(
        inverse_power(g, 0.5) @ inverse_power(g, 0.5) @ g, torch.eye(6, dtype=torch.float64)
    )
    stats = CrossStats.from_rows(x, x @ r)
    torch.testing.assert_close(whitened_cross(stats, 0.5), r)
    with pytest.raises(ConfigError, match="whitening power"):
        whitened_cross(stats, 0.7)
    semi = procrustes(torch.randn(4, 7, generator=gen))
    torch.testing.assert_close(semi @ semi.T, torch.eye(4, dtype=torch.float64))


def test_recording_and_shape_errors() -> None:
    model_a, model_b, spec, maps = _rotated_pair()
    acts = record_activations(model_a, _batches(2), ["1"])
    assert acts[Site("1", "input")].shape == (128, 16) and acts[Site("1", "output")].shape == (128, 24)
    tau = dict(_tau(model_a.state_dict(), seed=0))
    tau["3.weight"] = torch.zeros(16, 20)
    with pytest.raises(MismatchError, match=r"3\.weight \(module 3\): axis 1 has width 20"):
        apply_transforms(tau, maps, spec)
    groups = dict(spec.groups)  # layer 4 reads hidden.2 (16 wide), wrongly put in hidden.1 (24 wide)
    groups["hidden.1"] = (*groups["hidden.1"], ("4.weight", 1))
    groups["hidden.2"] = tuple(a for a in groups["hidden.2"] if a != ("4.weight", 1))
    bad = PermutationSpec(groups)
    with pytest.raises(MismatchError, match="module '4'"):
        space_statistics(model_a, model_b, _batches(1), bad)
    with pytest.raises(MismatchError, match="module '0'"):
        cross_statistics(model_a, model_b, _batches(1), ["0"], forward_fn_b=lambda m, x: m(x[:10]))
    with pytest.raises(ConfigError, match="'nope'"):
        record_activations(model_a, _batches(1), ["nope"])
    with pytest.raises(ConfigError, match="not in the spec"):
        theseus_transforms({"other": CrossStats.from_rows(torch.ones(3, 2), torch.ones(3, 2))}, spec)
