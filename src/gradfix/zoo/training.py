"""The training loop shared by the scenario builders: AdamW, cosine schedule with warm-up, seeded batches."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from gradfix.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters of one training run (recorded in the artifact's manifest)."""

    steps: int
    lr: float
    batch_size: int
    weight_decay: float = 0.1
    warmup_fraction: float = 0.1
    seed: int = 0
    grad_clip: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict."""
        return asdict(self)


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor at ``step`` (0-based): linear warm-up to 1, then cosine decay to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


def seeded_batches(items: Sequence[T], batch_size: int, seed: int) -> Iterator[list[T]]:
    """Endless batches of ``items``: a fresh seeded permutation each epoch, the last partial batch dropped.

    With fewer items than ``batch_size`` every batch holds all of them, reshuffled.
    """
    if not items:
        raise ConfigError("cannot draw training batches from an empty list")
    generator = torch.Generator().manual_seed(seed)
    size = min(batch_size, len(items))
    while True:
        order = torch.randperm(len(items), generator=generator).tolist()
        for start in range(0, len(order) - size + 1, size):
            yield [items[i] for i in order[start : start + size]]


def train(
    model: nn.Module,
    params: Sequence[Tensor],
    step_loss: Callable[[int], Tensor],
    settings: TrainSettings,
    desc: str = "training",
    progress: bool = True,
) -> dict[str, Any]:
    """Minimise ``step_loss(step)`` over ``params`` with AdamW and a cosine schedule with warm-up.

    ``torch.manual_seed(settings.seed)`` is set first, so dropout is reproducible. The model is in
    train mode during the loop and in eval mode afterwards. Gradients are clipped to norm
    ``grad_clip`` (0 turns clipping off). Returns the mean loss of the first and last tenth of the
    steps and the wall time.
    """
    if settings.steps < 1:
        raise ConfigError(f"steps must be positive, got {settings.steps}")
    torch.manual_seed(settings.seed)
    params = list(params)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    warmup = round(settings.warmup_fraction * settings.steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, settings.steps, warmup)
    )
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(settings.steps), desc=desc, unit="step", disable=not progress, leave=False)
    try:
        for step in bar:
            optimizer.zero_grad(set_to_none=True)
            loss = step_loss(step)
            loss.backward()
            if settings.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    finally:
        bar.close()
        model.eval()
    tenth = max(len(losses) // 10, 1)
    return {
        "loss_first_tenth": sum(losses[:tenth]) / tenth,
        "loss_last_tenth": sum(losses[-tenth:]) / tenth,
        "train_seconds": round(time.perf_counter() - start, 2),
    }
