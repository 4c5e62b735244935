"""Theseus: Procrustes maps recovered from activations (or weights), within and across widths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradfix import ConfigError, MismatchError, TaskVector
from gradfix.methods.activations import CrossStats, Site, channels_last, cross_statistics, record_activations
from gradfix.methods.theseus import (
    apply_transforms,
    data_free_transforms,
    inverse_power,
    procrustes,
    space_statistics,
    spec_sites,
    theseus_data_free_task_vector,
    theseus_from_models,
    theseus_task_vector,
    theseus_transforms,
    whitened_cross,
)
from gradfix.methods.transfusion import PermutationSpec, spec_for_module, spec_for_state_dict
from gradfix.zoo.vision import SmallCNN


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


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("whiten", [0.0, 0.25, 0.5])
def test_rotated_hidden_spaces_recovered_from_activations(whiten: float, center: bool) -> None:
    model_a, model_b, spec, maps = _rotated_pair()
    stats = space_statistics(model_a, model_b, _batches(), spec, center=center)
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


def _cnn_pair(width: int = 8, dim: int = 16) -> tuple[SmallCNN, SmallCNN, PermutationSpec, dict]:
    """A SmallCNN and a copy with the channels of its three hidden spaces permuted (same function)."""
    torch.manual_seed(0)
    model_a = SmallCNN(width, dim)
    spec = spec_for_module(model_a)
    gen = torch.Generator().manual_seed(1)
    maps = {
        g: _permutation_map(torch.randperm(n, generator=gen))
        for g, n in spec.sizes(model_a.state_dict()).items()
    }
    model_b = SmallCNN(width, dim)
    model_b.load_state_dict(apply_transforms(model_a.state_dict(), maps, spec))
    return model_a, model_b, spec, maps


def _images(n: int = 24, seed: int = 0) -> list[torch.Tensor]:
    return list(torch.rand(n, 28, 28, generator=torch.Generator().manual_seed(seed)).split(8))


def test_cnn_spec_and_channel_sites() -> None:
    model, _, spec, _ = _cnn_pair()
    assert spec.groups == {
        "hidden.0": (("conv1.weight", 0), ("conv1.bias", 0), ("conv2.weight", 1)),
        "hidden.1": (("conv2.weight", 0), ("conv2.bias", 0), ("conv3.weight", 1)),
        "hidden.2": (("conv3.weight", 0), ("conv3.bias", 0), ("proj.weight", 1)),
    }  # proj's rows (the embedding, the model's output) and conv1's input channels stay fixed
    acts = record_activations(model, _images(4), [("conv1", "output"), ("conv2", "input"), ("proj", "input")])
    assert acts[Site("conv1", "output")].shape == (4 * 28 * 28, 8)  # B·H·W tokens of C channels
    assert acts[Site("conv2", "input")].shape == (4 * 14 * 14, 8)
    assert acts[Site("proj", "input")].shape == (4, 32)
    conv = nn.Conv2d(3, 5, 1)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(channels_last(conv, x)[0, 1, 2], x[0, :, 1, 2])
    torch.testing.assert_close(channels_last(conv, x[0])[1, 2], x[0, :, 1, 2])  # unbatched
    assert channels_last(nn.Linear(4, 4), x) is x
    with pytest.raises(ConfigError, match="groups=2"):
        spec_for_module(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1)))
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1))
    with pytest.raises(ConfigError, match="groups=2"):
        spec_sites(grouped, PermutationSpec({"h": (("0.weight", 0), ("1.weight", 1))}))
    with pytest.raises(ConfigError, match="module 2 has"):  # C·H·W flattened into a linear layer
        spec_for_module(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 2)))


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("whiten", [0.0, 0.5])
def test_cnn_permuted_channels_recovered(whiten: float, center: bool) -> None:
    model_a, model_b, spec, maps = _cnn_pair()
    x = torch.rand(10, 28, 28)
    torch.testing.assert_close(model_b(x), model_a(x), atol=1e-5, rtol=0)  # same function
    tau_a = _tau(model_a.state_dict(), seed=3)
    expected = apply_transforms(tau_a, maps, spec)
    stats = space_statistics(model_a, model_b, _images(), spec, center=center)
    assert stats["hidden.0"].count == 24 * (28 * 28 + 14 * 14) and stats["hidden.2"].count == 24 * 7 * 7 + 24
    _close(theseus_transforms(stats, spec, whiten=whiten), maps, atol=1e-6)
    _close(theseus_task_vector(tau_a, stats, spec, whiten=whiten), expected)
    found = theseus_from_models(tau_a, model_a, model_b, _images(), whiten=whiten, center=center)
    _close(found, expected)  # spec detected
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    _close(theseus_data_free_task_vector(tau_a, sd_a, sd_b, spec, whiten=whiten), expected)
    assert torch.equal(expected["proj.bias"], tau_a["proj.bias"])


def test_cnn_cross_width_gives_target_shapes() -> None:
    torch.manual_seed(0)
    model_a, model_b = SmallCNN(8, 16), SmallCNN(6, 16)
    spec = spec_for_module(model_a)
    tau_a = _tau(model_a.state_dict(), seed=0)
    shapes_b = {n: tuple(t.shape) for n, t in model_b.state_dict().items()}
    tau_b = theseus_from_models(tau_a, model_a, model_b, _images())
    assert tau_b.shapes() == shapes_b and shapes_b["conv2.weight"] == (12, 6, 3, 3)
    transforms = theseus_transforms(space_statistics(model_a, model_b, _images(), spec), spec)
    t = transforms["hidden.2"]
    assert t.shape == (32, 24)
    torch.testing.assert_close(t.T @ t, torch.eye(24, dtype=torch.float64), atol=1e-8, rtol=0)
    data_free = theseus_data_free_task_vector(tau_a, model_a.state_dict(), model_b.state_dict(), spec)
    assert data_free.shapes() == shapes_b and all(bool(v.isfinite().all()) for v in data_free.values())
    with pytest.raises(ConfigError, match="module conv1 has"):  # state dicts alone: convolutions not guessed
        spec_for_state_dict(model_a.state_dict())


def _centred(x_a: torch.Tensor, x_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``C, G_A, G_B`` of the mean-centred rows, computed directly."""
    x_a, x_b = x_a.double(), x_b.double()
    x_a, x_b = x_a - x_a.mean(0), x_b - x_b.mean(0)
    return x_a.T @ x_b, x_a.T @ x_a, x_b.T @ x_b


def _assert_stats(stats: CrossStats, expected: tuple[torch.Tensor, ...], count: int) -> None:
    assert stats.count == count
    for found, want in zip((stats.cross, stats.gram_a, stats.gram_b), expected, strict=True):
        assert found.dtype == torch.float64
        torch.testing.assert_close(found, want, atol=1e-9, rtol=1e-9)


def test_centring_is_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    x_a = 3.0 + torch.randn(30, 5, generator=gen, dtype=torch.float64)  # large means
    x_b = x_a[:, :4] @ torch.randn(4, 4, generator=gen, dtype=torch.float64) - 2.0
    pieces = CrossStats.from_rows(x_a[:7], x_b[:7]) + CrossStats.from_rows(x_a[7:], x_b[7:])
    centred = pieces.centered()  # sums of two batches, centred once with the overall means
    _assert_stats(centred, _centred(x_a, x_b), 30)
    torch.testing.assert_close(centred.sum_a, torch.zeros(5, dtype=torch.float64))
    _assert_stats(centred.centered(), _centred(x_a, x_b), 30)  # centring twice changes nothing
    with pytest.raises(ConfigError, match="row sums"):
        CrossStats(pieces.cross, pieces.gram_a, pieces.gram_b, 30).centered()

    # recorded: each site centred with its own means over all batches, then pooled per space
    model_a, model_b, spec, _ = _cnn_pair()
    images = _images()
    sites = [("conv1", "output"), ("conv2", "input")]  # the two sites of space hidden.0
    acts_a = record_activations(model_a, images, sites)
    acts_b = record_activations(model_b, images, sites)
    per_site = cross_statistics(model_a, model_b, images, sites, center=True)
    raw = cross_statistics(model_a, model_b, images, sites)
    for site in map(lambda s: Site(*s), sites):
        _assert_stats(per_site[site], _centred(acts_a[site], acts_b[site]), acts_a[site].shape[0])
        assert not torch.allclose(raw[site].cross, per_site[site].cross)  # GELU means matter
    direct = [_centred(acts_a[Site(*s)], acts_b[Site(*s)]) for s in sites]
    pooled = space_statistics(model_a, model_b, images, spec, center=True)["hidden.0"]
    _assert_stats(pooled, tuple(p + q for p, q in zip(*direct, strict=True)), 24 * (28 * 28 + 14 * 14))
