"""Per-sample gradient sign votes of the target model at its unchanged weights (GradFix step 1)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from gradfix.checks import check_same_architecture
from gradfix.errors import ConfigError, GradfixError
from gradfix.ops.signs import count_dtype, majority_sign, mean_sign
from gradfix.settings import Engine, Estimator
from gradfix.votes.accumulator import Accumulator, sum_dtype
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
Gradient = Literal["sum", "none"]
"""What a majority vote keeps of the gradient: its sum over samples (float32), or nothing."""
GRADIENTS: tuple[Gradient, ...] = get_args(Gradient)
"""``("sum", "none")``."""


@dataclass
class SignVotes:
    """Vote sums of the target's anti-gradient signs over ``num_samples`` samples.

    - ``counts[name]``: ``Σ_j sign(−g^(j))`` per coordinate, in the smallest integer dtype that
      holds ``num_samples`` (empty for the ``mean`` estimator, which needs no per-sample pass);
    - ``grad_sum[name]``: ``Σ_j g^(j)`` in float32 (``ḡ = grad_sum / n`` is the mean gradient);
      empty for majority votes taken with ``gradient="none"`` (:func:`estimate_signs`): then
      only the counts are held, at most 2 bytes per voting parameter (1 below 128 samples);
    - ``hits[name]``: how many samples gave that tensor a non-zero gradient.

    ``sign()`` gives the estimate ``ŝ`` of the anti-gradient sign: ``sign(counts)`` for the
    majority vote (Eq. 9) or ``sign(−grad_sum)`` for the mean estimator. Two estimates add up
    (votes of several workers, or pooled examples of several tasks); the sum keeps gradient sums
    only if both have them.
    """

    counts: dict[str, Tensor]
    grad_sum: dict[str, Tensor]
    num_samples: int
    estimator: Estimator = "majority"
    hits: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"unknown estimator {self.estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if self.grad_sum and self.counts and set(self.counts) != set(self.grad_sum):
            raise ConfigError("vote counts and gradient sums must cover the same tensors")
        if self.estimator == "majority" and self.grad_sum and not self.counts:
            raise ConfigError("the majority estimator needs vote counts for every tensor")
        if self.estimator == "mean" and self.counts and not self.grad_sum:
            raise ConfigError("the mean estimator needs gradient sums; these votes kept none")

    @classmethod
    def zeros(
        cls, params: Mapping[str, Tensor], estimator: Estimator = "majority", gradient: Gradient = "sum"
    ) -> SignVotes:
        """No votes yet on ``params`` (zero counts, and zero sums unless ``gradient="none"``)."""
        check_gradient(gradient)
        counts = (
            {n: torch.zeros(p.shape, dtype=torch.int8) for n, p in params.items()}
            if estimator == "majority"
            else {}
        )
        keep = gradient == "sum" or estimator == "mean"
        grad_sum = {n: torch.zeros(p.shape, dtype=sum_dtype(p)) for n, p in params.items()} if keep else {}
        return cls(counts, grad_sum, 0, estimator, dict.fromkeys(params, 0))

    @property
    def has_gradient(self) -> bool:
        """Whether the gradient sums were kept (the mean estimator, :meth:`mean_gradient`)."""
        return bool(self.grad_sum) or not self.counts

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` of the tensors that were voted on."""
        return _shapes(self.grad_sum or self.counts)

    def names(self) -> list[str]:
        """Names of the tensors that were voted on."""
        return list(self.grad_sum or self.counts)

    def sign(self) -> dict[str, Tensor]:
        """``{name: int8 tensor in {−1, 0, 1}}``: the estimated sign of the anti-gradient."""
        if self.estimator == "majority":
            return {n: majority_sign(c) for n, c in self.counts.items()}
        return {n: mean_sign(g) for n, g in self.grad_sum.items()}

    def mean_gradient(self) -> dict[str, Tensor]:
        """``ḡ = (1/n) Σ_j g^(j)``, the gradient of the mean loss over the voting samples.

        Raises a :class:`ConfigError` for votes that kept no gradient sums (``gradient="none"``).
        """
        if not self.has_gradient:
            raise ConfigError(
                "these votes kept no gradient sums (taken with gradient='none'); vote with "
                "gradient='sum' for the mean gradient"
            )
        n = max(self.num_samples, 1)
        return {name: g / n for name, g in self.grad_sum.items()}

    def untouched(self) -> list[str]:
        """Tensors that received no non-zero gradient from any sample (they cast no vote)."""
        return [n for n in self.names() if self.hits.get(n, 0) == 0]

    def with_estimator(self, estimator: Estimator) -> SignVotes:
        """The same evidence read with another estimator (``mean`` needs the gradient sums)."""
        if estimator == "mean" and not self.grad_sum:
            raise ConfigError("the mean estimator needs gradient sums; these votes kept none")
        return SignVotes(self.counts, self.grad_sum, self.num_samples, estimator, self.hits)

    def without_gradient(self) -> SignVotes:
        """The majority votes without their gradient sums (the counts only)."""
        if not self.counts:
            raise ConfigError("votes of the mean estimator are their gradient sums; they cannot be dropped")
        return SignVotes(self.counts, {}, self.num_samples, self.estimator, self.hits)

    def __add__(self, other: SignVotes) -> SignVotes:
        if not isinstance(other, SignVotes):
            return NotImplemented
        check_same_architecture({"left votes": self.shapes(), "right votes": other.shapes()})
        n = self.num_samples + other.num_samples
        dtype = count_dtype(n)
        counts = {}
        if self.counts and other.counts:
            counts = {k: (self.counts[k].to(torch.int64) + other.counts[k]).to(dtype) for k in self.counts}
        grad_sum = {}
        if self.has_gradient and other.has_gradient:
            grad_sum = {k: self.grad_sum[k] + other.grad_sum[k] for k in self.grad_sum}
        if not counts and not grad_sum:
            raise ConfigError("cannot add majority votes without gradient sums to votes without counts")
        estimator = self.estimator if counts or self.estimator == "mean" else "mean"
        return SignVotes(
            counts=counts,
            grad_sum=grad_sum,
            num_samples=n,
            estimator=estimator,
            hits={k: self.hits.get(k, 0) + other.hits.get(k, 0) for k in self.names()},
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


def check_gradient(gradient: str) -> None:
    """Raise a :class:`ConfigError` unless ``gradient`` is one of :data:`GRADIENTS`."""
    if gradient not in GRADIENTS:
        raise ConfigError(f"unknown gradient {gradient!r}; choose one of {', '.join(GRADIENTS)}")


# -- the vote -----------------------------------------------------------------------------------
def estimate_signs(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn,
    estimator: Estimator = "majority",
    *,
    engine: Engine = "auto",
    chunk_size: int = 8,
    progress: bool = True,
    gradient: Gradient = "sum",
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

    ``gradient`` says what the majority vote keeps besides its counts: ``"sum"`` (the default,
    as before) keeps ``Σ_j g^(j)`` in float32, 4 bytes per voting parameter, for the mean
    gradient (:meth:`SignVotes.mean_gradient`: the descent report, the ``magnitude`` and
    ``tensorwise`` masks, the ``mean`` estimator read later); ``"none"`` keeps only the vote
    counters, and the mean gradient, when needed, comes from one summed backward
    (:func:`gradfix.votes.summed.summed_gradients`, exact for the mean gradient). The ``mean``
    estimator always keeps its sums (they are its votes).

    The counters are as narrow as the number of samples allows when ``batches`` is a sequence (a
    list: its samples are counted before the vote): ``int8`` below 128 samples, 1 byte per voting
    parameter while voting; for another iterable, ``int16`` (``int32`` past 32 767 samples). A
    vote count never exceeds the number of samples, so the votes are the same either way.
    """
    if estimator not in ESTIMATORS:
        raise ConfigError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    check_gradient(gradient)
    params: dict[str, Tensor] = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise GradfixError("the model has no parameter with requires_grad=True to vote on")
    majority = estimator == "majority"
    # batches given as a list: the number of samples is known, so is the narrowest counter
    known = sum(batch_size(b) for b in batches) if isinstance(batches, Sequence) else None
    acc = Accumulator(params, majority, with_sums=not majority or gradient == "sum", samples=known)
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
    counts, grad_sum = acc.result(estimator)
    return SignVotes(counts, grad_sum, acc.n, estimator, acc.hits)


class _Runner:
    """Feeds batches to the chosen per-sample engine, with the loop as the fallback."""

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, Tensor],
        loss_fn: LossFn,
        acc: Accumulator,
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
    model: nn.Module, params: Mapping[str, Tensor], batch: Any, loss_fn: LossFn, acc: Accumulator, size: int
) -> None:
    loss = check_losses(loss_fn(model, batch), size).sum()
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    for name, g in zip(names, grads, strict=True):
        acc.add_summed(name, g, size)
