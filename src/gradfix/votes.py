"""Per-sample gradient sign votes of the target model at its unchanged weights (GradFix step 1)."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from gradfix.checks import check_same_architecture
from gradfix.errors import CheckpointError, ConfigError, GradfixError
from gradfix.ops.signs import count_dtype, majority_sign, mean_sign

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> per-sample losses`` of shape ``[batch]``."""

ESTIMATORS = ("majority", "mean")
ENGINES = ("auto", "vmap", "loop")
_KIND = "gradfix.sign_votes"


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
    estimator: str = "majority"
    hits: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"unknown estimator {self.estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if self.estimator == "majority" and set(self.counts) != set(self.grad_sum):
            raise ConfigError("the majority estimator needs vote counts for every tensor")

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

    def with_estimator(self, estimator: str) -> SignVotes:
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
        """Write the votes to one safetensors file, so that a long vote can be resumed or split."""
        path = Path(path)
        tensors = {f"grad_sum/{n}": g.contiguous() for n, g in self.grad_sum.items()}
        tensors.update({f"counts/{n}": c.contiguous() for n, c in self.counts.items()})
        meta = {
            "format": "pt",
            "gradfix_kind": _KIND,
            "num_samples": str(self.num_samples),
            "estimator": self.estimator,
            "hits": json.dumps(self.hits),
        }
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> SignVotes:
        """Read votes written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable votes file ({exc})") from exc
        if meta.get("gradfix_kind") != _KIND:
            raise CheckpointError(f"{path}: not a gradfix votes file (no gradfix_kind={_KIND} header)")
        return cls(
            counts={k[len("counts/") :]: v for k, v in tensors.items() if k.startswith("counts/")},
            grad_sum={k[len("grad_sum/") :]: v for k, v in tensors.items() if k.startswith("grad_sum/")},
            num_samples=int(meta["num_samples"]),
            estimator=meta["estimator"],
            hits={k: int(v) for k, v in json.loads(meta.get("hits", "{}")).items()},
        )


def _shapes(tensors: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in tensors.items()}


# -- batches ------------------------------------------------------------------------------------
def batch_size(batch: Any) -> int:
    """Number of samples in a batch: the first dimension of its first tensor."""
    for leaf in _leaves(batch):
        if isinstance(leaf, Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    raise GradfixError("a batch must hold at least one tensor with a sample axis first")


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of a batch (a tensor, or a dict/list/tuple of tensors and lists)."""
    if isinstance(batch, Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return {k: slice_batch(v, start, stop) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        if batch and all(isinstance(x, (Tensor, Mapping, list, tuple)) for x in batch):
            return type(batch)(slice_batch(x, start, stop) for x in batch)
        return batch[start:stop]
    return batch


def _leaves(batch: Any) -> Iterator[Any]:
    if isinstance(batch, Mapping):
        for v in batch.values():
            yield from _leaves(v)
    elif isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], (Tensor, Mapping)):
        for v in batch:
            yield from _leaves(v)
    else:
        yield batch


# -- the vote -----------------------------------------------------------------------------------
class _Accumulator:
    """Running vote sums in int32 and gradient sums in float32 (float64 for float64 params)."""

    def __init__(self, params: Mapping[str, Tensor], with_counts: bool):
        self.grad_sum = {n: torch.zeros_like(p, dtype=_sum_dtype(p)) for n, p in params.items()}
        self.counts = (
            {n: torch.zeros(p.shape, dtype=torch.int32) for n, p in params.items()} if with_counts else {}
        )
        self.hits = dict.fromkeys(params, 0)
        self.n = 0

    def add_per_sample(self, name: str, grads: Tensor) -> None:
        """Add the per-sample gradients of one tensor, shape ``[b, *shape]``."""
        grads = grads.detach()
        self.grad_sum[name] += grads.sum(dim=0).to(self.grad_sum[name].dtype)
        self.counts[name] += torch.sign(grads.neg()).to(torch.int32).sum(dim=0, dtype=torch.int32)
        self.hits[name] += int(grads.flatten(1).ne(0).any(dim=1).sum())

    def add_summed(self, name: str, grad: Tensor | None, samples: int) -> None:
        """Add the gradient of a summed loss over ``samples`` samples (mean estimator)."""
        if grad is not None:
            self.grad_sum[name] += grad.detach().to(self.grad_sum[name].dtype)
            self.hits[name] += samples if bool(grad.ne(0).any()) else 0

    def result(self, estimator: str) -> SignVotes:
        dtype = count_dtype(self.n)
        counts = {k: v.to(dtype) for k, v in self.counts.items()}
        return SignVotes(counts, self.grad_sum, self.n, estimator, self.hits)


def _sum_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def estimate_signs(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn,
    estimator: str = "majority",
    *,
    engine: str = "auto",
    chunk_size: int = 8,
    progress: bool = True,
) -> SignVotes:
    """Estimate the sign of the target's anti-gradient from per-sample gradients (Eq. 9).

    ``loss_fn(model, batch)`` must return per-sample losses of shape ``[batch]``. Only parameters
    with ``requires_grad`` take part. The model is put in eval mode while voting (no dropout) and
    restored afterwards; its weights are not changed.

    - ``majority``: ``ŝ_i = sign(Σ_j sign(−g_i^(j)))`` with ``g^(j)`` each sample's gradient;
    - ``mean``: ``ŝ_i = sign(−Σ_j g_i^(j))``, from one ordinary backward pass per batch.

    ``engine`` picks how per-sample gradients are computed for the majority vote: ``loop`` (one
    backward pass per sample), ``vmap`` (``torch.func.vmap(grad)`` over chunks of ``chunk_size``
    samples) or ``auto`` (vmap, falling back to the loop for models that vmap cannot trace).
    """
    if estimator not in ESTIMATORS:
        raise ConfigError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise GradfixError("the model has no parameter with requires_grad=True to vote on")
    acc = _Accumulator(params, with_counts=estimator == "majority")
    was_training = model.training
    model.eval()
    use_vmap = engine in ("auto", "vmap")
    bar = tqdm(unit="sample", desc="sign votes", disable=not progress, leave=False)
    try:
        for batch in batches:
            size = batch_size(batch)
            if estimator == "mean":
                _summed_backward(model, params, batch, loss_fn, acc, size)
            else:
                step = chunk_size if use_vmap else 1
                for start in range(0, size, step):
                    stop = min(start + step, size)
                    done = False
                    if use_vmap:
                        try:
                            _vmap_chunk(model, params, slice_batch(batch, start, stop), loss_fn, acc)
                            done = True
                        except Exception as exc:
                            if engine == "vmap" or acc.n > 0:
                                raise
                            log.info("vmap could not trace the loss (%s); one backward per sample", exc)
                            use_vmap = False
                    if not done:
                        for i in range(start, stop):
                            _loop_sample(model, params, slice_batch(batch, i, i + 1), loss_fn, acc)
                    acc.n += stop - start
                    bar.update(stop - start)
                continue
            acc.n += size
            bar.update(size)
    finally:
        bar.close()
        model.train(was_training)
    if acc.n == 0:
        raise GradfixError("no samples to vote on: the batches were empty")
    return acc.result(estimator)


def _check_losses(losses: Tensor, expected: int) -> Tensor:
    if losses.dim() != 1 or losses.shape[0] != expected:
        raise GradfixError(
            f"loss_fn must return per-sample losses of shape [{expected}], got {tuple(losses.shape)}"
            " (use reduction='none')"
        )
    return losses


def _loop_sample(
    model: nn.Module, params: Mapping[str, Tensor], sample: Any, loss_fn: LossFn, acc: _Accumulator
) -> None:
    loss = _check_losses(loss_fn(model, sample), 1).sum()
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    for name, g in zip(names, grads, strict=True):
        if g is not None:
            acc.add_per_sample(name, g.unsqueeze(0))


def _summed_backward(
    model: nn.Module, params: Mapping[str, Tensor], batch: Any, loss_fn: LossFn, acc: _Accumulator, size: int
) -> None:
    loss = _check_losses(loss_fn(model, batch), size).sum()
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    for name, g in zip(names, grads, strict=True):
        acc.add_summed(name, g, size)


class _LossModule(nn.Module):
    """Wraps ``loss_fn`` so that ``torch.func.functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


def _vmap_chunk(
    model: nn.Module, params: Mapping[str, Tensor], chunk: Any, loss_fn: LossFn, acc: _Accumulator
) -> None:
    from torch.func import functional_call, grad, vmap
    from torch.utils._pytree import tree_map

    wrapper = _LossModule(model, loss_fn)
    detached = {f"model.{n}": p.detach() for n, p in params.items()}

    def one_sample_loss(weights: dict[str, Tensor], sample: Any) -> Tensor:
        batch1 = tree_map(lambda x: x.unsqueeze(0) if isinstance(x, Tensor) else x, sample)
        return _check_losses(functional_call(wrapper, weights, (batch1,)), 1).sum()

    with warnings.catch_warnings():  # ops without a batching rule fall back to a loop: correct, slower
        warnings.filterwarnings("ignore", message="There is a performance drop")
        per_sample = vmap(grad(one_sample_loss), in_dims=(None, 0), randomness="different")(detached, chunk)
    for key, g in per_sample.items():
        acc.add_per_sample(key[len("model.") :], g)
