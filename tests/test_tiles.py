"""The tiled linear votes (any device): the same counts as the loop of one backward per sample.

Run on the CPU (``GRADFIX_TILES`` forces the path there); the products are formed in tiles of
output rows whose size comes from a memory budget, so odd shapes and budgets of a row or two are
checked against per-sample products formed whole, against the C kernel, and, through the hooks
engine on a tiny Llama, against ``estimate_signs(engine="loop")``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradfix import estimate_signs
from gradfix.votes import native, tiles
from gradfix.votes.hooks import hook_gradients, hooked_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


def _whole(x: Tensor, g: Tensor) -> Tensor:
    """Every sample's ``δ_bᵀ x_b`` formed whole, as a backward of one sample does (``mm``)."""
    return torch.stack([g[b].t() @ x[b] for b in range(x.shape[0])])


def _reference(x: Tensor, g: Tensor, counts: Tensor, sums: Tensor) -> int:
    grads = _whole(x, g)
    sums += grads.sum(dim=0)
    counts -= torch.sign(grads).sum(dim=0).to(counts.dtype)
    return int(grads.flatten(1).ne(0).any(dim=1).sum())


def _inputs(samples: int, tokens: int, out_dim: int, in_dim: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, tokens, in_dim, generator=gen)
    g = torch.randn(samples, tokens, out_dim, generator=gen)
    if samples > 2:
        g[1] = 0.0  # a sample with no gradient casts no vote and is no hit
    return x, g


@pytest.mark.parametrize(
    ("samples", "tokens", "out_dim", "in_dim"),
    [(1, 1, 1, 1), (3, 7, 13, 17), (5, 1, 33, 9), (4, 11, 2, 65), (7, 3, 31, 1)],
)
@pytest.mark.parametrize("rows", [1, 2, 5, None])
def test_tiles_equal_whole_products(samples: int, tokens: int, out_dim: int, in_dim: int, rows: Any) -> None:
    x, g = _inputs(samples, tokens, out_dim, in_dim)
    per_row = samples * in_dim * 5  # float32 products and a byte of mask per value
    budget = tiles.TILE_BYTES if rows is None else rows * per_row
    chosen = tiles.tile_rows(samples, out_dim, in_dim, x.dtype, budget, x.device)
    assert chosen == min(out_dim, rows or out_dim)
    counts = torch.randint(-3, 4, (out_dim, in_dim), dtype=torch.int16)
    sums = torch.randn(out_dim, in_dim)
    want_counts, want_sums = counts.clone(), sums.clone()
    want_hits = _reference(x, g, want_counts, want_sums)
    hits = tiles.add_linear_votes(x, g, counts, sums, budget=budget)
    assert hits == want_hits == samples - (samples > 2)
    assert torch.equal(counts, want_counts)
    assert torch.allclose(sums, want_sums, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not native.available(), reason="no C kernel on this machine")
def test_tiles_equal_the_c_kernel() -> None:
    x, g = _inputs(6, 9, 40, 24, seed=3)
    x[:, :, 5] = 0.0  # a column no sample moves
    counts, sums = torch.zeros(40, 24, dtype=torch.int16), torch.zeros(40, 24)
    hits = native.add_linear_votes(x, g, sums, counts)
    tiled_counts, tiled_sums = torch.zeros(40, 24, dtype=torch.int16), torch.zeros(40, 24)
    assert tiles.add_linear_votes(x, g, tiled_counts, tiled_sums, budget=3 * 6 * 24 * 5) == hits == 5
    assert torch.equal(tiled_counts, counts)
    assert torch.allclose(tiled_sums, sums, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("count_dtype", [torch.int8, torch.int32, torch.int64])
def test_no_gradient_sum_and_other_counters(count_dtype: torch.dtype) -> None:
    x, g = _inputs(3, 4, 6, 5, seed=1)
    counts = torch.zeros(6, 5, dtype=count_dtype)
    want = torch.zeros(6, 5, dtype=torch.int16)
    _reference(x, g, want, torch.zeros(6, 5))
    assert tiles.add_linear_votes(x, g, counts, None, budget=1) == 2
    assert counts.dtype == count_dtype and torch.equal(counts.long(), want.long())


def test_bad_shapes_and_dtypes_are_named() -> None:
    x, g = _inputs(2, 3, 4, 5)
    counts = torch.zeros(4, 5, dtype=torch.int16)
    with pytest.raises(ValueError, match=r"x \[b, tokens, in\]"):
        tiles.add_linear_votes(x[0], g, counts)
    with pytest.raises(ValueError, match=r"counts must be an integer tensor of shape \(4, 5\)"):
        tiles.add_linear_votes(x, g, counts.t())
    with pytest.raises(ValueError, match="counts must be an integer"):
        tiles.add_linear_votes(x, g, counts.float())
    with pytest.raises(ValueError, match="share a floating dtype"):
        tiles.add_linear_votes(x.double(), g, counts)
    with pytest.raises(ValueError, match=r"grad_sum must have shape \(4, 5\)"):
        tiles.add_linear_votes(x, g, counts, torch.zeros(5, 4))
    assert torch.equal(counts, torch.zeros(4, 5, dtype=torch.int16))


def test_when_the_tiles_are_used(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, meta = torch.device("cpu"), torch.device("meta")
    monkeypatch.delenv("GRADFIX_TILES", raising=False)
    assert not tiles.wanted(cpu) and tiles.wanted(meta) and not tiles.forced()
    assert tiles.wanted(cpu, torch.bfloat16) and tiles.wanted(cpu, torch.float16)
    assert not tiles.wanted(cpu, torch.float64)
    monkeypatch.setenv("GRADFIX_TILES", "1")
    assert tiles.wanted(cpu) and tiles.forced()
    monkeypatch.setenv("GRADFIX_TILES", "off")
    assert not tiles.wanted(cpu) and not tiles.wanted(meta) and not tiles.wanted(cpu, torch.bfloat16)
    assert tiles.product_dtype(torch.bfloat16) == tiles.product_dtype(torch.float16) == torch.float32
    assert tiles.product_dtype(torch.float64) == torch.float64


# -- through the hooks engine, against the loop ----------------------------------------------------
class TiledSink:
    """A vote sink whose linear weights are counted by the tiled path (as on a GPU)."""

    def __init__(self, params: dict[str, Tensor], budget: int):
        self.counts = {n: torch.zeros(p.shape, dtype=torch.int16, device=p.device) for n, p in params.items()}
        self.budget = budget
        self.linear: set[str] = set()

    def add_per_sample(self, name: str, grads: Tensor) -> None:
        self.counts[name] -= torch.sign(grads).sum(dim=0).to(torch.int16)

    def add_rows(self, name: str, rows: Tensor, grads: Tensor, samples: Tensor) -> None:
        self.counts[name].index_add_(0, rows, -torch.sign(grads).to(torch.int16))

    def add_linear(self, name: str, x: Tensor, grad_out: Tensor) -> bool:
        self.linear.add(name)
        tiles.add_linear_votes(x, grad_out, self.counts[name], budget=self.budget)
        return True


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=61,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Per-sample mean next-token cross-entropy."""
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return losses.mean(dim=1)


def test_hooks_with_tiles_equal_the_loop_on_a_llama() -> None:
    model = tiny_llama()
    batch = {"input_ids": torch.randint(0, 61, (5, 9), generator=torch.Generator().manual_seed(1))}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    loop = estimate_signs(model, [batch], lm_loss, engine="loop", progress=False)
    covered = hooked_parameters(model, params)
    sink = TiledSink(params, budget=2 * 5 * 40 * 5)  # two rows of the widest input per tile
    hook_gradients(model, params, batch, lm_loss, sink, covered)
    projections = {n for n in params if n.endswith("proj.weight")}
    assert projections and projections <= sink.linear  # every projection went through the tiles
    for name in sink.linear:
        assert torch.equal(sink.counts[name], loop.counts[name].to(torch.int16)), name


@pytest.mark.parametrize("gradient", ["sum", "none"])
def test_estimate_signs_counts_linear_weights_by_tiles_when_forced(
    monkeypatch: pytest.MonkeyPatch, gradient: str
) -> None:
    """``GRADFIX_TILES=1``: the vote's own accumulator sends every linear weight to the tiles
    (as it does on a GPU), with the same votes (and gradient sums) as the loop."""
    model = tiny_llama(seed=2)
    batch = {"input_ids": torch.randint(0, 61, (4, 7), generator=torch.Generator().manual_seed(3))}
    loop = estimate_signs(model, [batch], lm_loss, engine="loop", progress=False)
    called: list[tuple[int, ...]] = []
    real = tiles.add_linear_votes

    def spy(x: Tensor, grad_out: Tensor, counts: Tensor, grad_sum: Tensor | None = None, **kw: Any) -> int:
        called.append(tuple(counts.shape))
        return real(x, grad_out, counts, grad_sum, **kw)

    monkeypatch.setattr(tiles, "add_linear_votes", spy)
    monkeypatch.setenv("GRADFIX_TILES", "1")
    tiled = estimate_signs(model, [batch], lm_loss, engine="hooks", progress=False, gradient=gradient)  # type: ignore[arg-type]
    assert len(called) >= 2 * 7  # q, k, v, o, gate, up, down in both layers
    for name, counts in loop.counts.items():
        assert torch.equal(tiled.counts[name], counts), name
    if gradient == "sum":
        for name, total in loop.grad_sum.items():
            torch.testing.assert_close(tiled.grad_sum[name], total, rtol=1e-5, atol=1e-6)
    else:
        assert not tiled.has_gradient
