"""Record module inputs and outputs with forward hooks, and their cross-model statistics.

A *site* is one module's input or output. Activations are flattened over every axis but the
feature axis (``[tokens, width]``): the last axis, or the channel axis (1) of a channels-first
module (convolutions, batch/instance/group norms), so that ``[B, C, H, W]`` gives ``B·H·W`` tokens
of width ``C``. Two models run in lockstep on the same batches give, per site, the float64
statistics Theseus needs, without keeping any token:

```
C = Σ X_Aᵀ X_B   (d_A × d_B),   G_A = Σ X_Aᵀ X_A,   G_B = Σ X_Bᵀ X_B,   s_A = Σ x_A,   s_B = Σ x_B
```

With centring (``center=True``) each site's statistics are those of its mean-centred rows,
``μ = s / n`` over all ``n`` rows of the site (every batch), computed once at the end from the
float64 sums, which is exact:

```
C = Σ (x_A − μ_A)ᵀ (x_B − μ_B) = Σ x_Aᵀ x_B − n μ_A μ_Bᵀ,   G_A = Σ x_Aᵀ x_A − n μ_A μ_Aᵀ,   likewise G_B
```
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from gradfix.errors import ConfigError, MismatchError

ForwardFn = Callable[[nn.Module, Any], Any]
"""``forward_fn(model, batch)``: runs the model on one batch (its return value is ignored)."""

TokenMask = Callable[[Any], Tensor | None]
"""``token_mask(batch)``: a boolean mask over the batch's tokens (e.g. the attention mask), or None."""

SITE_KINDS = ("input", "output")


class Site(NamedTuple):
    """One module's ``"input"`` (first positional argument) or ``"output"`` (first tensor returned)."""

    module: str
    kind: str

    def __str__(self) -> str:
        return f"{self.module}:{self.kind}"


@dataclass
class CrossStats:
    """``C = Σ X_Aᵀ X_B``, ``G_A = Σ X_Aᵀ X_A``, ``G_B = Σ X_Bᵀ X_B`` over ``count`` rows, in float64.

    ``sum_a = Σ x_A`` and ``sum_b = Σ x_B`` (row sums, ``None`` when unknown) allow exact centring
    (:meth:`centered`). Statistics of several batches or sites of the same widths add up with ``+``.
    """

    cross: Tensor
    gram_a: Tensor
    gram_b: Tensor
    count: int = 0
    sum_a: Tensor | None = None
    sum_b: Tensor | None = None

    @classmethod
    def from_rows(cls, x_a: Tensor, x_b: Tensor) -> CrossStats:
        """Statistics of paired rows ``X_A [n, d_A]`` and ``X_B [n, d_B]``."""
        x_a, x_b = x_a.double(), x_b.double()
        return cls(x_a.T @ x_b, x_a.T @ x_a, x_b.T @ x_b, x_a.shape[0], x_a.sum(0), x_b.sum(0))

    def centered(self) -> CrossStats:
        """The statistics of the mean-centred rows ``x − μ`` (``μ = sum / count``), exactly, in float64.

        ``C − n μ_A μ_Bᵀ`` and ``G − n μ μᵀ`` (``= C − s_A s_Bᵀ / n``, ...); the sums become zero.
        """
        if self.sum_a is None or self.sum_b is None:
            raise ConfigError("cannot centre statistics recorded without their row sums")
        if self.count <= 0:
            raise ConfigError("cannot centre statistics of no rows")
        s_a, s_b, n = self.sum_a.double(), self.sum_b.double(), float(self.count)
        return CrossStats(
            self.cross.double() - torch.outer(s_a, s_b) / n,
            self.gram_a.double() - torch.outer(s_a, s_a) / n,
            self.gram_b.double() - torch.outer(s_b, s_b) / n,
            self.count,
            torch.zeros_like(s_a),
            torch.zeros_like(s_b),
        )

    @property
    def widths(self) -> tuple[int, int]:
        """``(d_A, d_B)``."""
        return self.cross.shape[0], self.cross.shape[1]

    def __add__(self, other: CrossStats) -> CrossStats:
        if self.widths != other.widths:
            raise MismatchError(f"cannot add statistics of widths {self.widths} and {other.widths}")
        sum_a: Tensor | None = None
        sum_b: Tensor | None = None
        if (
            self.sum_a is not None
            and self.sum_b is not None
            and other.sum_a is not None
            and other.sum_b is not None
        ):
            sum_a, sum_b = self.sum_a + other.sum_a, self.sum_b + other.sum_b
        return CrossStats(
            self.cross + other.cross,
            self.gram_a + other.gram_a,
            self.gram_b + other.gram_b,
            self.count + other.count,
            sum_a,
            sum_b,
        )


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a mapping, ``model(batch[0])`` for a tuple/list, else ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def attention_mask_of(batch: Any) -> Tensor | None:
    """The default token mask: ``batch["attention_mask"]`` when the batch is a mapping with one."""
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), Tensor):
        return batch["attention_mask"]
    return None


def _as_sites(names: Sequence[str | Site | tuple[str, str]]) -> list[Site]:
    sites: list[Site] = []
    for item in names:
        if isinstance(item, str):
            sites += [Site(item, "input"), Site(item, "output")]
        else:
            site = Site(*item)
            if site.kind not in SITE_KINDS:
                raise ConfigError(f"site {site}: kind must be 'input' or 'output'")
            sites.append(site)
    return list(dict.fromkeys(sites))


CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm)
"""Modules whose inputs and outputs carry their features on axis 1 (``[B, C, *spatial]``)."""


def channels_last(module: nn.Module, value: Tensor) -> Tensor:
    """``value`` with the features of ``module`` on the last axis (channel axis moved last).

    Channels-first modules (:data:`CHANNELS_FIRST`) read ``[B, C, *spatial]``; an unbatched
    convolution input ``[C, *spatial]`` has its channels on axis 0. Other modules: unchanged.
    """
    if not isinstance(module, CHANNELS_FIRST) or value.dim() < 2:
        return value
    if isinstance(module, nn.modules.conv._ConvNd) and value.dim() == len(module.kernel_size) + 1:
        return value.movedim(0, -1)
    return value.movedim(1, -1)


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value:
        return _first_tensor(value[0])
    return None


@contextmanager
def _capture(model: nn.Module, sites: Sequence[Site]) -> Iterator[dict[Site, list[Tensor]]]:
    """Forward hooks that append each site's activation (detached) to a list per site."""
    store: dict[Site, list[Tensor]] = {s: [] for s in sites}
    handles = []
    try:
        for module_name in dict.fromkeys(s.module for s in sites):
            try:
                module = model.get_submodule(module_name)
            except AttributeError as exc:
                raise ConfigError(f"module {module_name!r} not found in {type(model).__name__}") from exc
            wanted = [s for s in sites if s.module == module_name]

            def hook(mod: nn.Module, args: tuple, output: Any, wanted: list[Site] = wanted) -> None:
                for site in wanted:
                    value = _first_tensor(args if site.kind == "input" else output)
                    if value is not None:
                        store[site].append(channels_last(mod, value.detach()))

            handles.append(module.register_forward_hook(hook))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def _rows(site: Site, chunks: list[Tensor], mask: Tensor | None) -> Tensor:
    """Activations of one forward pass as ``[rows, width]``; masked tokens dropped when shapes allow."""
    if not chunks:
        raise ConfigError(f"module {site.module!r} was not called during the forward pass")
    rows = torch.cat([c.reshape(-1, c.shape[-1]) for c in chunks])
    if mask is not None and len(chunks) == 1 and mask.numel() == rows.shape[0]:
        rows = rows[mask.reshape(-1).to(device=rows.device, dtype=torch.bool)]
    return rows


@contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)


def record_activations(
    model: nn.Module,
    batches: Iterable[Any],
    module_names: Sequence[str | Site | tuple[str, str]],
    forward_fn: ForwardFn | None = None,
    *,
    token_mask: TokenMask | None = attention_mask_of,
) -> dict[Site, Tensor]:
    """``{site: X}`` with ``X = [tokens, width]`` stacked over all batches (kept in memory).

    Channels-first modules (convolutions, batch norms) give ``[B·H·W, C]`` (:func:`channels_last`).
    ``module_names``: module names (both input and output recorded) or ``Site``s. The model runs in
    eval mode without gradients; tokens where ``token_mask(batch)`` is false are dropped.
    """
    forward = forward_fn or default_forward
    sites = _as_sites(module_names)
    out: dict[Site, list[Tensor]] = {s: [] for s in sites}
    with _eval_mode(model), _capture(model, sites) as store:
        for batch in batches:
            for chunks in store.values():
                chunks.clear()
            forward(model, batch)
            mask = token_mask(batch) if token_mask else None
            for site in sites:
                out[site].append(_rows(site, store[site], mask).cpu())
    return {s: torch.cat(chunks) for s, chunks in out.items() if chunks}


def cross_statistics(
    model_a: nn.Module,
    model_b: nn.Module,
    batches: Iterable[Any],
    sites: Sequence[str | Site | tuple[str, str]],
    forward_fn: ForwardFn | None = None,
    *,
    forward_fn_b: ForwardFn | None = None,
    token_mask: TokenMask | None = attention_mask_of,
    center: bool = False,
) -> dict[Site, CrossStats]:
    """Per site, ``C = Σ X_Aᵀ X_B``, ``G_A = Σ X_Aᵀ X_A``, ``G_B = Σ X_Bᵀ X_B`` over all batches.

    Both models see each batch in turn (``forward_fn`` for A, ``forward_fn_b`` for B, default the
    same); only the float64 sums are kept. A site must give the same number of rows in both
    models (same inputs, same tokens), else a :class:`MismatchError` names the module.
    ``center=True``: each site's statistics of its mean-centred rows, with that site's means over
    all batches, ``C = Σ (x_A − μ_A)ᵀ (x_B − μ_B)`` (:meth:`CrossStats.centered`, exact).
    """
    forward_a = forward_fn or default_forward
    forward_b = forward_fn_b or forward_a
    wanted = _as_sites(sites)
    totals: dict[Site, CrossStats] = {}
    with (
        _eval_mode(model_a, model_b),
        _capture(model_a, wanted) as store_a,
        _capture(model_b, wanted) as store_b,
    ):
        for batch in batches:
            for chunks in [*store_a.values(), *store_b.values()]:
                chunks.clear()
            forward_a(model_a, batch)
            forward_b(model_b, batch)
            mask = token_mask(batch) if token_mask else None
            for site in wanted:
                x_a, x_b = _rows(site, store_a[site], mask), _rows(site, store_b[site], mask)
                if x_a.shape[0] != x_b.shape[0]:
                    raise MismatchError(
                        f"module {site.module!r} ({site.kind}): model A gave {x_a.shape[0]} rows, model B "
                        f"{x_b.shape[0]}; run both models on the same inputs"
                    )
                stats = CrossStats.from_rows(x_a.cpu(), x_b.cpu())
                if site in totals and totals[site].widths != stats.widths:
                    raise MismatchError(
                        f"module {site.module!r} ({site.kind}): width changed between batches"
                    )
                totals[site] = totals[site] + stats if site in totals else stats
    return {site: stats.centered() for site, stats in totals.items()} if center else totals
