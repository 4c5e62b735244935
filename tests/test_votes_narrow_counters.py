"""Counters as narrow as the number of samples allows: int8 while voting below 128 samples (C
kernel, tiles, PyTorch operations, embedding rows), the brute-force loop's votes, and int16/int32
from 128 samples on or when the number of samples is not known before the vote."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
import torch
from brute_force import brute_force_votes
from torch import nn

from gradfix import estimate_signs
from gradfix.votes import accumulator, native, tiles
from gradfix.votes.accumulator import Accumulator, counter_dtype

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")
pytestmark = pytest.mark.usefixtures("one_thread")


class _Model(nn.Module):
    """An embedding (rows), linear layers (C kernel or tiles) and a layer norm (per-sample chunks)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 8)
        self.up, self.norm, self.down = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 3)
        self.to(dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.norm(self.up(self.embed(ids))))).mean(dim=1)


def _batches(n: int, size: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids, y = torch.randint(0, 11, (n, 5), generator=g), torch.randint(0, 3, (n,), generator=g)
    return [{"ids": ids[i : i + size], "y": y[i : i + size]} for i in range(0, n, size)]


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch["ids"]), batch["y"], reduction="none")


def _brute_force(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return brute_force_votes(model, batches, _loss)[0]


class _Watch:
    """The counters' dtypes and bytes at the end of each vote (before they are returned)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[tuple[set[torch.dtype], int]] = []
        result = Accumulator.result

        def watched(acc: Accumulator, estimator: str) -> object:
            self.seen.append(({t.dtype for t in acc.counts.values()}, acc.state_bytes()))
            return result(acc, estimator)  # type: ignore[arg-type]

        monkeypatch.setattr(accumulator.Accumulator, "result", watched)


@pytest.mark.parametrize("path", ["kernel", "tiles", "torch"])
@pytest.mark.parametrize("gradient", ["none", "sum"])
def test_int8_counters_while_voting_give_the_brute_force_votes(monkeypatch, path: str, gradient: str) -> None:
    if path == "kernel" and not native.available():
        pytest.skip("no C kernel here")
    monkeypatch.setenv("GRADFIX_TILES", "1" if path == "tiles" else "0")
    monkeypatch.setenv("GRADFIX_NATIVE", "0" if path == "torch" else "1")
    model, batches = _Model(torch.float64), _batches(45, 16)
    watch = _Watch(monkeypatch)
    kernel_calls: list[torch.dtype] = []
    for module in (native, tiles):
        original = module.add_linear_votes

        def counted(*args, _original=original, **kwargs):  # type: ignore[no-untyped-def]
            result = _original(*args, **kwargs)
            if result is not None:
                counters = [a for a in args if a is not None and not a.is_floating_point()]
                kernel_calls.append(counters[0].dtype)
            return result

        monkeypatch.setattr(module, "add_linear_votes", counted)
    votes = estimate_signs(model, batches, _loss, engine="hooks", progress=False, gradient=gradient)  # type: ignore[arg-type]
    params = sum(p.numel() for p in model.parameters())
    dtypes, state = watch.seen[-1]
    assert dtypes == {torch.int8}
    assert state == params * (1 if gradient == "none" else 9)  # float64 sums: 8 bytes
    if path != "torch":  # both linear weights, in each of the three batches, counted by that path in int8
        assert kernel_calls == [torch.int8] * 6
    else:
        assert kernel_calls == []
    expected = _brute_force(model, batches)
    for name, counts in expected.items():
        assert votes.counts[name].dtype == torch.int8, name
        assert torch.equal(votes.counts[name].long(), counts), name


def test_float32_votes_with_int8_and_int16_counters_are_equal() -> None:
    model, batches = _Model(torch.float32), _batches(40, 8)
    narrow = estimate_signs(model, batches, _loss, progress=False, gradient="none")
    wide = estimate_signs(model, iter(batches), _loss, progress=False, gradient="none")
    assert narrow.hits == wide.hits and narrow.num_samples == wide.num_samples == 40
    for name, counts in wide.counts.items():
        assert torch.equal(narrow.counts[name], counts), name


def test_128_samples_or_more_and_unknown_sizes_count_in_int16(monkeypatch) -> None:
    model = _Model(torch.float32)
    watch = _Watch(monkeypatch)
    estimate_signs(model, _batches(130, 65), _loss, progress=False, gradient="none")
    assert watch.seen[-1][0] == {torch.int16}
    estimate_signs(model, _batches(127, 64), _loss, progress=False, gradient="none")
    assert watch.seen[-1][0] == {torch.int8}

    def stream() -> Iterator[dict[str, torch.Tensor]]:  # a generator: its length is not known
        yield from _batches(20, 8)

    votes = estimate_signs(model, stream(), _loss, progress=False, gradient="none")
    assert watch.seen[-1][0] == {torch.int16}
    assert all(c.dtype == torch.int8 for c in votes.counts.values())  # returned narrow all the same


def test_counter_dtype_and_widening_past_the_declared_size() -> None:
    assert counter_dtype(None) == torch.int16 and counter_dtype(0) == counter_dtype(127) == torch.int8
    assert counter_dtype(128) == counter_dtype(32767) == torch.int16
    assert counter_dtype(32768) == counter_dtype(2**40) == torch.int32
    acc = Accumulator({"w": torch.zeros(3, 2)}, True, with_sums=False, samples=100)
    grads = torch.ones(100, 3, 2)
    acc.widen_for(100)
    acc.add_per_sample("w", grads)
    acc.n = 100
    assert acc.counts["w"].dtype == torch.int8 and int(acc.counts["w"][0, 0]) == -100
    acc.widen_for(100)  # more samples than declared: widened before they come, never wrapped
    acc.add_per_sample("w", grads)
    acc.n = 200
    assert acc.counts["w"].dtype == torch.int16 and int(acc.counts["w"][0, 0]) == -200
    counts, _ = acc.result("majority")
    assert counts["w"].dtype == torch.int16 and counts["w"].eq(-200).all()


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_counts_in_int8_and_without_sums(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(9, 3000, generator=g, dtype=dtype)
    grads[:, 10:40] = 0.0
    grads[5] = 0.0
    start = torch.randint(-100, 100, (3000,), generator=g).to(torch.int8)
    sums, with_sums, without = torch.zeros(3000, dtype=dtype), start.clone(), start.clone()
    assert native.add_votes(grads, sums, with_sums) == native.add_votes(grads, None, without) == 8
    expected = (start.long() - torch.sign(grads).sum(dim=0).long()).to(torch.int8)
    assert torch.equal(with_sums, expected) and torch.equal(without, expected)
    torch.testing.assert_close(sums, grads.sum(dim=0))

    x = torch.randn(7, 4, 37, generator=g, dtype=dtype)
    grad_out = torch.randn(7, 4, 29, generator=g, dtype=dtype)
    grad_out[2] = 0.0
    products = torch.bmm(grad_out.transpose(1, 2), x)
    expected = -torch.sign(products).sum(dim=0).to(torch.int8)
    for kept in (torch.zeros(29, 37, dtype=dtype), None):
        counts = torch.zeros(29, 37, dtype=torch.int8)
        assert native.add_linear_votes(x, grad_out, kept, counts) == 6
        assert torch.equal(counts, expected)
    tiled = torch.zeros(29, 37, dtype=torch.int8)
    assert tiles.add_linear_votes(x, grad_out, tiled, budget=7 * 5 * 37 * 9) == 6  # tiles of 5 rows
    assert torch.equal(tiled, expected)
