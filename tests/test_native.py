"""The C vote kernel: the same counts, sums and hits as PyTorch operations, and a clean fallback."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from gradfix import estimate_signs
from gradfix.votes import native

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")


def _torch_votes(grads: torch.Tensor, grad_sum: torch.Tensor, counts: torch.Tensor) -> int:
    grad_sum += grads.sum(dim=0)
    counts -= torch.sign(grads).sum(dim=0).to(counts.dtype)
    return int(grads.ne(0).any(dim=1).sum())


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("count_dtype", [torch.int16, torch.int32])
def test_kernel_equals_torch_operations(dtype: torch.dtype, count_dtype: torch.dtype) -> None:
    assert native.available()
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(7, 5000, generator=g, dtype=dtype)
    grads[:, 100:300] = 0.0  # coordinates no sample moves
    grads[4, 7] = -0.0  # a negative zero is no vote
    grads[:, 400:420] = torch.randint(-2, 3, (7, 20), generator=g).to(dtype)  # exact ties and zeros
    grads[2] = 0.0  # a sample with no gradient
    start_sum = torch.randn(5000, generator=g, dtype=dtype)
    start_counts = torch.randint(-50, 50, (5000,), generator=g).to(count_dtype)
    sums, counts = start_sum.clone(), start_counts.clone()
    hits = native.add_votes(grads, sums, counts)
    expected_sums, expected_counts = start_sum.clone(), start_counts.clone()
    expected_hits = _torch_votes(grads, expected_sums, expected_counts)
    assert hits == expected_hits == 6
    assert torch.equal(counts, expected_counts)
    assert torch.allclose(sums, expected_sums, rtol=0, atol=1e-5)


@needs_compiler
def test_kernel_declines_what_it_cannot_take() -> None:
    grads, sums, counts = torch.randn(3, 10), torch.zeros(10), torch.zeros(10, dtype=torch.int16)
    assert native.add_votes(grads.half(), sums, counts) is None  # dtype
    assert native.add_votes(grads, sums.double(), counts) is None  # mixed dtypes
    assert native.add_votes(grads.t().contiguous().t(), sums, counts) is None  # not contiguous
    assert native.add_votes(grads, sums, counts.long()) is None  # counter dtype
    assert native.add_votes(grads[:, :9], sums, counts) is None  # sizes
    assert torch.equal(sums, torch.zeros(10)) and torch.equal(counts, torch.zeros(10, dtype=torch.int16))


def test_disabled_kernel_gives_the_same_votes(monkeypatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 5))
    data = {"x": torch.randn(40, 3, 12), "y": torch.randint(0, 5, (40,))}

    def loss(m: nn.Module, batch: dict) -> torch.Tensor:
        return nn.functional.cross_entropy(m(batch["x"]).mean(dim=1), batch["y"], reduction="none")

    with_kernel = estimate_signs(model, [data], loss, engine="hooks", progress=False)
    monkeypatch.setenv("GRADFIX_NATIVE", "0")
    assert not native.available()
    without = estimate_signs(model, [data], loss, engine="hooks", progress=False)
    for name in with_kernel.counts:
        assert torch.equal(with_kernel.counts[name], without.counts[name]), name
        assert torch.allclose(with_kernel.grad_sum[name], without.grad_sum[name], atol=1e-5), name
    assert with_kernel.hits == without.hits


def test_no_compiler_falls_back_to_torch(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("GRADFIX_CACHE", str(tmp_path / "cache"))
    native._library.cache_clear()
    try:
        assert not native.available()
        grads = torch.randn(3, 10)
        assert native.add_votes(grads, torch.zeros(10), torch.zeros(10, dtype=torch.int16)) is None
    finally:
        native._library.cache_clear()
    assert not (tmp_path / "cache").exists()


@needs_compiler
def test_failed_build_leaves_no_file_and_a_broken_compiler_is_not_used(monkeypatch, tmp_path) -> None:
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'error: broken' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("GRADFIX_CACHE", str(tmp_path / "cache"))
    native._library.cache_clear()
    try:
        assert not native.available()
    finally:
        native._library.cache_clear()
    assert list((tmp_path / "cache").rglob("*.so")) == []


@needs_compiler
def test_kernel_is_built_once_into_the_cache(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("GRADFIX_CACHE", str(tmp_path / "cache"))
    native._library.cache_clear()
    try:
        assert native.available()
        built = list((tmp_path / "cache").rglob("*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        native._library.cache_clear()
        assert native.available()
        assert built[0].stat().st_mtime_ns == stamp
    finally:
        native._library.cache_clear()


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("count_dtype", [torch.int16, torch.int32])
@pytest.mark.parametrize(("tokens", "out_dim", "in_dim"), [(5, 37, 50), (1, 24, 64), (48, 13, 3)])
def test_linear_kernel_equals_per_sample_products(dtype, count_dtype, tokens, out_dim, in_dim) -> None:
    """Tiles at the edges (sizes not multiples of the tile), one token, narrow inputs."""
    g = torch.Generator().manual_seed(tokens + out_dim)
    x = torch.randn(6, tokens, in_dim, generator=g, dtype=dtype)
    grad_out = torch.randn(6, tokens, out_dim, generator=g, dtype=dtype)
    grad_out[3] = 0.0  # a sample with no gradient
    x[:, :, 1] = 0.0  # an input column no sample uses: exact zeros, no vote
    start_sum = torch.randn(out_dim, in_dim, generator=g, dtype=dtype)
    start_counts = torch.randint(-9, 9, (out_dim, in_dim), generator=g).to(count_dtype)
    sums, counts = start_sum.clone(), start_counts.clone()
    hits = native.add_linear_votes(x, grad_out, sums, counts)
    products = torch.bmm(grad_out.transpose(1, 2), x)  # [b, out, in]
    expected_sums, expected_counts = start_sum.clone(), start_counts.clone()
    expected_hits = _torch_votes(products.reshape(6, -1), expected_sums.view(-1), expected_counts.view(-1))
    assert hits == expected_hits == 5
    assert torch.equal(counts, expected_counts)
    assert torch.allclose(sums, expected_sums, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_linear_kernel_declines_what_it_cannot_take() -> None:
    x, grad_out = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    sums, counts = torch.zeros(5, 4), torch.zeros(5, 4, dtype=torch.int16)
    assert native.add_linear_votes(x, grad_out, sums.t().contiguous(), counts) is None  # shape
    assert native.add_linear_votes(x, grad_out[:, :2], sums, counts) is None  # tokens differ
    assert native.add_linear_votes(x.bfloat16(), grad_out.bfloat16(), sums, counts) is None  # dtype
    assert native.add_linear_votes(x, grad_out, sums.t().contiguous().t(), counts) is None  # layout
    assert native.add_linear_votes(x, grad_out, sums, counts) == 2  # and takes what it can


def test_keep_freed_memory_takes_effect_where_malloc_is_glibc() -> None:
    import platform

    assert native.keep_freed_memory() is (platform.libc_ver()[0] == "glibc")


@needs_compiler
def test_a_cache_it_cannot_write_gives_a_private_build(monkeypatch, tmp_path) -> None:
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    monkeypatch.setenv("GRADFIX_CACHE", str(blocked))
    native._library.cache_clear()
    try:
        assert native.available()
        grads = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
        sums, counts = torch.zeros(2), torch.zeros(2, dtype=torch.int16)
        assert native.add_votes(grads, sums, counts) == 2
        assert counts.tolist() == [-2, 1]
    finally:
        native._library.cache_clear()
    assert blocked.read_text() == ""
