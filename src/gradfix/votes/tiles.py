"""Votes of a linear weight on any device: per-sample products in tiles of output rows.

A linear weight's per-sample gradients are ``G_b = δ_bᵀ x_b`` (``x_b`` ``[tokens, in]`` the
layer's input and ``δ_b`` ``[tokens, out]`` its output gradient for sample ``b``). On the CPU the C
kernel (:mod:`gradfix.votes.native`) forms and counts them a register tile at a time. Elsewhere
(CUDA, or any device PyTorch runs on) :func:`add_linear_votes` does the same with batched matrix
products over tiles of output rows: for rows ``r0:r1`` one ``torch.bmm`` forms the tile
``[samples, rows, in]`` of every sample's gradient, which is summed over the samples into the
gradient sum (when one is kept), turned into signs in place and summed into the vote counts, before
the next tile overwrites it. The ``samples × parameters`` products are never held at once: a tile
is sized from a memory budget (:data:`TILE_BYTES`, at most a quarter of the free memory of a CUDA
device).

Dtypes: float32 and float64 products are computed in the model's dtype; bfloat16 and float16
products are accumulated in float32 (``torch.bmm(..., out_dtype=float32)`` on CUDA, inputs upcast
elsewhere), so each vote is the sign of the float32 sum over the sample's tokens of products of the
model's half-precision values. Counts stay integers and gradient sums float32 (float64 for a
float64 model).

:func:`wanted` says when a layer votes here: off the CPU and for half-precision layers. On the
CPU ``GRADFIX_TILES=1`` forces this path for every layer (in float32 it computes the same votes as
the C kernel and the loop of one backward per sample); ``GRADFIX_TILES=0`` turns it off.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

TILE_BYTES = 256 * 2**20
"""Default memory budget of one tile of per-sample products (and its mask of non-zero values)."""

_HALF = (torch.bfloat16, torch.float16)
_FLOATS = (torch.float32, torch.float64, *_HALF)
_COUNT_TYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


def _setting() -> str:
    return os.environ.get("GRADFIX_TILES", "").strip().lower()


def forced() -> bool:
    """Whether ``GRADFIX_TILES`` (``1``, ``true``, ``yes``, ``on``) asks for the tiled path everywhere."""
    return _setting() in ("1", "true", "yes", "on")


def wanted(device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """Whether a linear layer on ``device`` in ``dtype`` votes through :func:`add_linear_votes`.

    Yes off the CPU (where the C kernel does not run), for bfloat16 and float16 layers anywhere
    (the C kernel takes float32 and float64 only; here their products are accumulated in
    float32) and, when :func:`forced`, always; never when ``GRADFIX_TILES`` is ``0``, ``false``,
    ``no`` or ``off``.
    """
    if _setting() in ("0", "false", "no", "off"):
        return False
    return device.type != "cpu" or dtype in _HALF or forced()


def product_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype per-sample products of a ``dtype`` layer are accumulated and held in."""
    return torch.float32 if dtype in _HALF else dtype


def tile_rows(
    samples: int, out_dim: int, in_dim: int, dtype: torch.dtype, budget: int, device: torch.device
) -> int:
    """Output rows per tile: ``samples × rows × in`` products (and a byte each for the non-zero
    mask) within ``budget`` bytes, and within a quarter of a CUDA device's free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(budget, free // 4)
    per_row = samples * in_dim * (torch.empty((), dtype=product_dtype(dtype)).element_size() + 1)
    return max(1, min(out_dim, budget // max(per_row, 1)))


def _products(g_rows: Tensor, x: Tensor) -> Tensor:
    """``g_rows`` ``[b, rows, tokens]`` times ``x`` ``[b, tokens, in]``, accumulated in float32 for halves."""
    if g_rows.dtype not in _HALF:
        return torch.bmm(g_rows, x)
    if g_rows.device.type == "cuda":
        try:
            return torch.bmm(g_rows, x, out_dtype=torch.float32)
        except (RuntimeError, NotImplementedError, TypeError):  # an older PyTorch or GPU
            pass
    return torch.bmm(g_rows.float(), x.float())


def check_linear(x: Tensor, grad_out: Tensor, counts: Tensor, grad_sum: Tensor | None) -> None:
    """Raise ``ValueError`` unless the shapes, dtypes and devices fit :func:`add_linear_votes`."""
    if x.dim() != 3 or grad_out.dim() != 3 or x.shape[:2] != grad_out.shape[:2]:
        raise ValueError(
            f"linear votes need x [b, tokens, in] and grad_out [b, tokens, out], "
            f"got {tuple(x.shape)} and {tuple(grad_out.shape)}"
        )
    shape = (grad_out.shape[2], x.shape[2])
    if tuple(counts.shape) != shape or counts.dtype not in _COUNT_TYPES:
        got = f"{counts.dtype} {tuple(counts.shape)}"
        raise ValueError(f"counts must be an integer tensor of shape {shape}, got {got}")
    if grad_out.dtype not in _FLOATS or x.dtype != grad_out.dtype:
        raise ValueError(f"x and grad_out must share a floating dtype, got {x.dtype} and {grad_out.dtype}")
    if grad_sum is not None and (tuple(grad_sum.shape) != shape or grad_sum.device != counts.device):
        raise ValueError(f"grad_sum must have shape {shape} on {counts.device}, got {tuple(grad_sum.shape)}")


def add_linear_votes(
    x: Tensor,
    grad_out: Tensor,
    counts: Tensor,
    grad_sum: Tensor | None = None,
    *,
    budget: int = TILE_BYTES,
) -> int:
    """Add the votes of a linear weight's per-sample gradients ``G_b = δ_bᵀ x_b``, a tile of rows at a time.

    ``x`` ``[samples, tokens, in]`` and ``grad_out`` ``[samples, tokens, out]`` (one floating
    dtype, on one device); ``counts`` ``[out, in]`` (integer) receives ``−Σ_b sign(G_b)`` (the
    anti-gradient votes) and ``grad_sum`` ``[out, in]``, when given, ``Σ_b G_b``. Both may live on
    another device than the activations (their parameter's): each tile's sums are moved there.
    Returns how many samples have a non-zero gradient. Only ``samples × rows × in`` products
    (``rows`` from :func:`tile_rows` and ``budget`` bytes) exist at a time.
    """
    check_linear(x, grad_out, counts, grad_sum)
    samples, _, in_dim = x.shape
    out_dim = grad_out.shape[2]
    if samples == 0 or out_dim == 0 or in_dim == 0:
        return 0
    rows = tile_rows(samples, out_dim, in_dim, x.dtype, budget, x.device)
    x = x.contiguous()
    g_t = grad_out.transpose(1, 2)  # [b, out, tokens]; each tile's slice goes to bmm as a view
    nonzero = torch.zeros(samples, dtype=torch.bool, device=x.device)
    seen_all = False
    for start in range(0, out_dim, rows):
        stop = min(out_dim, start + rows)
        tile = _products(g_t[:, start:stop], x)  # [b, rows, in]
        if not seen_all:  # once every sample has a non-zero product, no tile needs checking
            nonzero |= tile.ne(0).flatten(1).any(dim=1)
            seen_all = bool(nonzero.all())
        if grad_sum is not None:
            grad_sum[start:stop] += tile.sum(dim=0).to(device=grad_sum.device, dtype=grad_sum.dtype)
        # Σ_b sign(G_b) over ±1 and 0 is exact in the tile's float dtype up to 2^24 samples
        votes = tile.sign_().sum(dim=0)
        counts[start:stop] -= votes.to(device=counts.device, dtype=counts.dtype)
        del tile, votes
    return int(nonzero.sum())


__all__ = ["TILE_BYTES", "add_linear_votes", "check_linear", "forced", "product_dtype", "tile_rows", "wanted"]
