"""Per-sample gradient sign votes of the target model at its unchanged weights (GradFix step 1)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from gradfix.checks import check_same_architecture
from gradfix.errors import ConfigError, GradfixError
from gradfix.ops.signs import count_dtype, majority_sign, mean_sign
from gradfix.settings import Engine, Estimator
from gradfix.votes import native
from gradfix.votes.file import read_votes, write_votes
from gradfix.votes.hooks import hook_gradients, hooked_parameters, outside_use, thread_invariant_kernels
from gradfix.votes.per_sample import (
    LossFn,
    Workspace,
    batch_size,
    check_losses,
    loop_gradients,
    slice_batch,
    vmap_gradients,
)

log = logging.getLogger(__name__)

ESTIMATORS: tuple[Estimator, ...] = get_args(Estimator)
"""The estimators, ``("majority", "mean")``."""
ENGINES: tuple[Engine, ...] = get_args(Engine)
"""The per-sample engines, ``("auto", "hooks", "vmap", "loop")``."""


@dataclass
class SignVotes:
    """Vote sums of the target's anti-gradient signs over ``num_samples`` samples.

    - ``counts[name]``: ``Σ_j sign(−g^(j))`` per coordinate, in the smallest integer dtype that
      holds ``num_samples`` (empty for the ``mean`` estimator, which needs no per-sample pass);
    - ``grad_sum[name]``: ``Σ_j g^(j)`` in float32 (``ḡ = grad_sum / n`` is the mean gradient);
    - ``hits[name]``: how many samples gave that tensor a non-zero gradient.

    ``sign()`` gives the estimate ``ŝ`` of the anti-gradient sign: ``sign(counts)`` for the
    majority vote (Eq. 9) or ``sign(−grad_sum)`` for the mean estimator. Two estimates add up
    (votes of several workers, or pooled examples of several tasks).
    """

    counts: dict[str, Tensor]
    grad_sum: dict[str, Tensor]
    num_samples: int
    estimator: Estimator = "majority"
    hits: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"unknown estimator {self.estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if self.estimator == "majority" and set(self.counts) != set(self.grad_sum):
            raise ConfigError("the majority estimator needs vote counts for every tensor")

    @classmethod
    def zeros(cls, params: Mapping[str, Tensor], estimator: Estimator = "majority") -> SignVotes:
        """No votes yet on ``params`` (zero counts and sums over zero samples)."""
        counts = (
            {n: torch.zeros(p.shape, dtype=torch.int8) for n, p in params.items()}
            if estimator == "majority"
            else {}
        )
        grad_sum = {n: torch.zeros(p.shape, dtype=_sum_dtype(p)) for n, p in params.items()}
        return cls(counts, grad_sum, 0, estimator, dict.fromkeys(params, 0))

    def names(self) -> list[str]:
        """Names of the tensors that were voted on."""
        return list(self.grad_sum)

    def sign(self) -> dict[str, Tensor]:
        """``{name: int8 tensor in {−1, 0, 1}}``: the estimated sign of the anti-gradient."""
        if self.estimator == "majority":
            return {n: majority_sign(c) for n, c in self.counts.items()}
        return {n: mean_sign(g) for n, g in self.grad_sum.items()}

    def mean_gradient(self) -> dict[str, Tensor]:
        """``ḡ = (1/n) Σ_j g^(j)``, the gradient of the mean loss over the voting samples."""
        n = max(self.num_samples, 1)
        return {name: g / n for name, g in self.grad_sum.items()}

    def untouched(self) -> list[str]:
        """Tensors that received no non-zero gradient from any sample (they cast no vote)."""
        return [n for n in self.grad_sum if self.hits.get(n, 0) == 0]

    def with_estimator(self, estimator: Estimator) -> SignVotes:
        """The same evidence read with another estimator (``mean`` is always available)."""
        return SignVotes(self.counts, self.grad_sum, self.num_samples, estimator, self.hits)

    def __add__(self, other: SignVotes) -> SignVotes:
        if not isinstance(other, SignVotes):
            return NotImplemented
        check_same_architecture(
            {"left votes": _shapes(self.grad_sum), "right votes": _shapes(other.grad_sum)}
        )
        n = self.num_samples + other.num_samples
        dtype = count_dtype(n)
        counts = {}
        if self.counts and other.counts:
            counts = {k: (self.counts[k].to(torch.int64) + other.counts[k]).to(dtype) for k in self.counts}
        estimator = self.estimator if counts or self.estimator == "mean" else "mean"
        return SignVotes(
            counts=counts,
            grad_sum={k: self.grad_sum[k] + other.grad_sum[k] for k in self.grad_sum},
            num_samples=n,
            estimator=estimator,
            hits={k: self.hits.get(k, 0) + other.hits.get(k, 0) for k in self.grad_sum},
        )

    def save(self, path: str | Path) -> Path:
        """Write the votes to one safetensors file, so that a long vote can be resumed or split.

        The format is that of :mod:`gradfix.votes.file`.
        """
        return write_votes(self, path)

    @classmethod
    def load(cls, path: str | Path) -> SignVotes:
        """Read votes written by :meth:`save` (checked by :func:`gradfix.votes.file.read_votes_header`)."""
        return read_votes(path)


def _shapes(tensors: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in tensors.items()}


# -- the vote -----------------------------------------------------------------------------------
class _Accumulator:
    """Running vote sums and gradient sums (float32; float64 for float64 parameters).

    Vote sums are kept in int16 while voting (half the memory of the gradient sums), widened to
    int32 when the number of samples could exceed int16's range, and returned in the smallest
    integer dtype that holds them.
    """

    def __init__(self, params: Mapping[str, Tensor], with_counts: bool):
        self.grad_sum = _Zeros({n: (p.shape, _sum_dtype(p), p.device) for n, p in params.items()})
        self.counts = _Zeros(
            {n: (p.shape, torch.int16, p.device) for n, p in params.items()} if with_counts else {}
        )
        self.hits = dict.fromkeys(params, 0)
        self.n = 0

    def add_per_sample(self, name: str, grads: Tensor) -> None:
        """Add the per-sample gradients of one tensor, shape ``[b, *shape]`` (one pass in C if it can)."""
        flat = grads.detach().reshape(grads.shape[0], -1)
        grad_sum, counts = self.grad_sum[name], self.counts[name]
        hits = native.add_votes(flat, grad_sum.view(-1), counts.view(-1))
        if hits is None:
            signs = torch.sign(flat)
            grad_sum += flat.sum(dim=0).view(grad_sum.shape).to(grad_sum.dtype)
            counts -= signs.sum(dim=0).view(counts.shape).to(counts.dtype)  # Σ sign(−g) = −Σ sign(g), exact
            hits = int(signs.ne(0).any(dim=1).sum())
        self.hits[name] += hits

    def add_linear(self, name: str, x: Tensor, grad_out: Tensor) -> bool:
        """Add a linear weight's per-sample gradients ``δ_bᵀ x_b`` with the C kernel, if it can."""
        hits = native.add_linear_votes(x.detach(), grad_out.detach(), self.grad_sum[name], self.counts[name])
        if hits is None:
            return False
        self.hits[name] += hits
        return True

    def add_rows(self, name: str, rows: Tensor, grads: Tensor, samples: Tensor) -> None:
        """Add per-sample gradients given only on some rows (an embedding): the others are 0.

        Entry ``k`` is the gradient of row ``rows[k]`` for sample ``samples[k]`` (each pair once).
        """
        grads = grads.detach()
        self.grad_sum[name].index_add_(0, rows, grads.to(self.grad_sum[name].dtype))
        self.counts[name].index_add_(0, rows, -torch.sign(grads).to(self.counts[name].dtype))
        self.hits[name] += int(torch.unique(samples[grads.flatten(1).ne(0).any(dim=1)]).numel())

    def widen_for(self, incoming: int) -> None:
        """Before a batch: switch the counters to int32 if ``n`` plus its samples could overflow int16."""
        if self.counts.shapes and self.n + incoming > torch.iinfo(torch.int16).max:
            self.counts.cast(torch.int32)

    def reset(self, name: str) -> None:
        """Forget everything added for ``name`` (its votes are recomputed)."""
        self.grad_sum[name].zero_()
        if self.counts.shapes:
            self.counts[name].zero_()
        self.hits[name] = 0

    def add_summed(self, name: str, grad: Tensor | None, samples: int) -> None:
        """Add the gradient of a summed loss over ``samples`` samples (mean estimator)."""
        if grad is not None:
            self.grad_sum[name] += grad.detach().to(self.grad_sum[name].dtype)
            self.hits[name] += samples if bool(grad.ne(0).any()) else 0

    def result(self, estimator: Estimator) -> SignVotes:
        dtype = count_dtype(self.n)
        counts = {k: v.to(device="cpu", dtype=dtype) for k, v in self.counts.all().items()}
        grad_sum = {k: v.cpu() for k, v in self.grad_sum.all().items()}
        return SignVotes(counts, grad_sum, self.n, estimator, self.hits)


class _Zeros(dict):
    """``{name: tensor of zeros}``, each made when first asked for.

    The running sums are thus allocated during the first backward, as a gradient would be, rather
    than before the forward pass: the allocator then reuses the memory the forward pass freed.
    """

    def __init__(self, shapes: Mapping[str, tuple[torch.Size, torch.dtype, torch.device]]):
        super().__init__()
        self.shapes = dict(shapes)

    def __missing__(self, name: str) -> Tensor:
        shape, dtype, device = self.shapes[name]
        made = self[name] = torch.zeros(shape, dtype=dtype, device=device)
        return made

    def all(self) -> dict[str, Tensor]:
        """Every tensor, in the order of the names given (made now if never asked for)."""
        return {name: self[name] for name in self.shapes}

    def cast(self, dtype: torch.dtype) -> None:
        """Switch every tensor, made or to be made, to ``dtype``."""
        self.shapes = {name: (shape, dtype, device) for name, (shape, _, device) in self.shapes.items()}
        for name, tensor in self.items():
            self[name] = tensor.to(dtype)


def _sum_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def estimate_signs(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn,
    estimator: Estimator = "majority",
    *,
    engine: Engine = "auto",
    chunk_size: int = 8,
    progress: bool = True,
) -> SignVotes:
    """Estimate the sign of the target's anti-gradient from per-sample gradients (Eq. 9).

    ``loss_fn(model, batch)`` must return per-sample losses of shape ``[batch]``. Only parameters
    with ``requires_grad`` take part. The model is put in eval mode while voting (no dropout) and
    restored afterwards; its weights are not changed.

    - ``majority``: ``ŝ_i = sign(Σ_j sign(−g_i^(j)))`` with ``g^(j)`` each sample's gradient;
    - ``mean``: ``ŝ_i = sign(−Σ_j g_i^(j))``, from one ordinary backward pass per batch.

    ``engine`` picks how per-sample gradients are computed for the majority vote (see
    :mod:`gradfix.votes.per_sample`): ``hooks`` (one batched forward and backward, per-sample gradients
    formed layer by layer; other parameters by the loop), ``vmap`` (``torch.func`` over chunks of
    ``chunk_size`` samples), ``loop`` (one backward pass per sample), or ``auto``: hooks, with the
    first batch watched for parameters used outside their module's call (a tied weight, a weight
    used directly; see :func:`gradfix.votes.hooks.outside_use`): those move to the loop.

    The result does not depend on the number of threads: the sums over samples are added in sample
    order, each coordinate by one thread (C kernel) or by PyTorch reductions whose order is fixed;
    the few PyTorch kernels whose rounding changes with the thread count run on one thread
    (:class:`gradfix.votes.hooks.thread_invariant_kernels`), and MKL's matrix products are in its
    strict reproducible mode (:func:`gradfix.votes.native.reproducible_blas`).
    """
    if estimator not in ESTIMATORS:
        raise ConfigError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    params: dict[str, Tensor] = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise GradfixError("the model has no parameter with requires_grad=True to vote on")
    acc = _Accumulator(params, with_counts=estimator == "majority")
    runner = _Runner(model, params, loss_fn, acc, engine, chunk_size)
    was_training = model.training
    model.eval()
    bar = tqdm(unit="sample", desc="sign votes", disable=not progress, leave=False)
    try:
        for batch in batches:
            size = batch_size(batch)
            acc.widen_for(size)
            with thread_invariant_kernels():  # the same bits with any number of threads
                if estimator == "mean":
                    _summed_backward(model, params, batch, loss_fn, acc, size)
                else:
                    runner.run(batch)
            acc.n += size
            bar.update(size)
    finally:
        bar.close()
        model.train(was_training)
    if acc.n == 0:
        raise GradfixError("no samples to vote on: the batches were empty")
    return acc.result(estimator)


class _Runner:
    """Feeds batches to the chosen per-sample engine, with the loop as the fallback."""

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, Tensor],
        loss_fn: LossFn,
        acc: _Accumulator,
        engine: Engine,
        chunk_size: int,
    ):
        self.model, self.params, self.loss_fn, self.acc = model, params, loss_fn, acc
        self.engine, self.chunk_size = engine, chunk_size
        self.covered = hooked_parameters(model, params) if engine in ("auto", "hooks") else {}
        self.checked = engine != "auto"
        self.workspace = Workspace()

    def _rest(self) -> dict[str, Tensor]:
        claimed = {n for names in self.covered.values() for n in names.values()}
        return {n: p for n, p in self.params.items() if n not in claimed}

    def run(self, batch: Any) -> None:
        if self.engine == "loop":
            loop_gradients(self.model, self.params, batch, self.loss_fn, self.acc)
        elif self.engine == "vmap":
            for start in range(0, batch_size(batch), self.chunk_size):
                chunk = slice_batch(batch, start, start + self.chunk_size)
                vmap_gradients(self.model, self.params, chunk, self.loss_fn, self.acc)
        else:
            if not self.checked:
                self._check_first_batch(batch)
                return
            self._hooks(batch)

    def _hooks(self, batch: Any, watch: Any = None) -> None:
        broadcast = hook_gradients(
            self.model, self.params, batch, self.loss_fn, self.acc, self.covered, self.workspace, watch
        )
        for module in broadcast:  # not per sample (shared over the batch): the loop computes them
            del self.covered[module]
        rest = self._rest()
        if rest:
            with _only_trainable(self.params, rest):
                loop_gradients(self.model, rest, batch, self.loss_fn, self.acc)

    def _check_first_batch(self, batch: Any) -> None:
        """Hooks on the first batch, watching for covered parameters used outside their module.

        Such a parameter gets a gradient the hooks do not see; it moves to the loop, and its votes
        on this batch are recomputed by the loop.
        """
        self.checked = True
        watch = outside_use(self.covered)  # entered around the forward pass only
        self._hooks(batch, watch)  # the accumulator is empty before the first batch
        wrong = watch.found
        if not wrong:
            return
        log.info(
            "per-sample hooks do not cover %s; those use one backward per sample", ", ".join(sorted(wrong))
        )
        for module in list(self.covered):
            kept = {k: n for k, n in self.covered[module].items() if n not in wrong}
            if kept:
                self.covered[module] = kept
            else:
                del self.covered[module]
        for name in wrong:
            self.acc.reset(name)
        redo = {n: self.params[n] for n in wrong}
        with _only_trainable(self.params, redo):
            loop_gradients(self.model, redo, batch, self.loss_fn, self.acc)


class _only_trainable:
    """Within the block only ``keep`` require gradients (the others are restored on exit)."""

    def __init__(self, params: Mapping[str, Tensor], keep: Mapping[str, Tensor]):
        self.params, self.keep = params, keep

    def __enter__(self) -> None:
        self.flags = {n: p.requires_grad for n, p in self.params.items()}
        for n, p in self.params.items():
            p.requires_grad_(n in self.keep)

    def __exit__(self, *exc: object) -> None:
        for n, p in self.params.items():
            p.requires_grad_(self.flags[n])


def _summed_backward(
    model: nn.Module, params: Mapping[str, Tensor], batch: Any, loss_fn: LossFn, acc: _Accumulator, size: int
) -> None:
    loss = check_losses(loss_fn(model, batch), size).sum()
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    for name, g in zip(names, grads, strict=True):
        acc.add_summed(name, g, size)
