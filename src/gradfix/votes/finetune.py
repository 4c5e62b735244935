"""Signs from the target's own few-shot fine-tune: where B moves when it trains on the shots.

The majority vote reads the sign of B's gradient at ``θ_B``, one step's direction. Far from A
(a release trained long at a large learning rate) that direction and the direction of B's full
fine-tune ``τ_B`` part ways: on such a release a vote of 500 labelled examples finds τ_B's
signs no better than one of 25. A short fine-tune of B on the same shots travels further along
the path the full fine-tune takes, and its displacement's signs are a better estimate:

```
θ_0 = θ_B,   θ_{i+1} = AdamW(θ_i, ∇ (1/n) Σ_j ℓ_j(θ_i)),   i < N      (full batch, constant lr)
ŝ = sign(θ_N − θ_B)
```

The estimate is returned as :class:`~gradfix.votes.SignVotes` of the ``mean`` estimator whose
``grad_sum`` is ``−(θ_N − θ_B)`` (so ``sign()`` gives ``ŝ``): every mask reads it as it reads
votes (the gate's margin is then ±1: every threshold up to 1 keeps the agreeing coordinates).
It is a displacement, not a gradient: the descent report's first-order terms do not apply to it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradfix.errors import ConfigError
from gradfix.votes.estimate import SignVotes

DEFAULT_STEPS = 120
"""Steps of the fine-tune. On the far release (BBC headlines, 5 shots per class, α on validation)
the mask on these signs reached 41 / 60 / 64 / 67 % test after 10 / 30 / 60 / 120 steps (seed 0)."""
DEFAULT_LR = 1e-4
"""Its learning rate (AdamW, no weight decay)."""

LossFn = Callable[[nn.Module, Any], Tensor]


def finetune_signs(
    model: nn.Module,
    batches: Sequence[Any],
    loss_fn: LossFn,
    *,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    runs: int = 1,
) -> SignVotes:
    """``ŝ = sign(θ_N − θ_B)`` after ``steps`` AdamW steps on the mean loss over ``batches``.

    Only parameters with ``requires_grad`` move and are estimated. The model trains in train mode
    (dropout as in fine-tuning, seeded by ``seed`` without touching the global random state) and
    gets its weights, gradients and mode back afterwards. ``loss_fn(model, batch)`` returns
    per-sample losses.
    ``runs`` > 1 sums the displacements of that many fine-tunes from ``θ_B`` (dropout seeded
    ``seed``, ``seed + 1000``, …): the signs of their mean, less tied to one run's dropout.
    """
    if steps < 1 or lr <= 0 or runs < 1:
        raise ConfigError(
            f"a fine-tune needs steps ≥ 1, lr > 0 and runs ≥ 1, got steps={steps}, lr={lr}, runs={runs}"
        )
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params or not batches:
        raise ConfigError("fine-tune signs need parameters with requires_grad and at least one batch")
    start = {n: p.detach().clone() for n, p in params.items()}
    grads = {n: p.grad for n, p in params.items()}  # the caller's, given back (usually none)
    was_training = model.training
    total: dict[str, Tensor] = {}
    try:
        for run in range(runs):
            samples = _finetune(model, params, batches, loss_fn, steps, lr, seed + 1000 * run)
            with torch.no_grad():
                for n, p in params.items():
                    moved = (p.detach() - start[n]).float()
                    total[n] = moved if n not in total else total[n] + moved
                    p.copy_(start[n])
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(start[n])
                p.grad = grads[n]  # the last step's gradients would outlive the call otherwise
        model.train(was_training)
    hits = {n: samples if bool(d.any()) else 0 for n, d in total.items()}
    return SignVotes({}, {n: d.neg_() for n, d in total.items()}, samples, "mean", hits)


def _finetune(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batches: Sequence[Any],
    loss_fn: LossFn,
    steps: int,
    lr: float,
    seed: int,
) -> int:
    """``steps`` AdamW steps in train mode, dropout seeded by ``seed`` (the global random state is
    kept); returns the number of samples per step."""
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    devices = [p.device for p in params.values() if p.device.type == "cuda"]
    samples = 0
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model.train()
        for _ in range(steps):
            samples = _step(model, batches, loss_fn, optimizer)
    return samples


def finetune_fold_signs(
    loss_fn: LossFn, *, seed: int = 0, runs: int = 1
) -> Callable[[nn.Module, Any], SignVotes]:
    """``(model, batch) -> finetune_signs(model, [batch], loss_fn, seed=seed, runs=runs)``: the
    per-fold sign estimator of :func:`gradfix.methods.autotune.score_on_shots` (its ``fold_signs``)."""
    return lambda model, batch: finetune_signs(model, [batch], loss_fn, seed=seed, runs=runs)


def _step(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn, optimizer: torch.optim.Optimizer) -> int:
    """One optimizer step on the mean per-sample loss over every batch; returns the sample count."""
    optimizer.zero_grad(set_to_none=True)
    losses = torch.cat([loss_fn(model, batch).reshape(-1) for batch in batches])
    losses.mean().backward()
    optimizer.step()
    return int(losses.numel())
