"""Data-parallel voting: each process votes on its share of the examples, the counts are summed.

Votes are sums over samples, so ``votes(all) = Σ_workers votes(share)`` exactly for the integer
vote counts (the float gradient sums agree up to the order of additions). Launch with
``torchrun``; on GPU clusters use the NCCL backend, on CPU gloo::

    torchrun --nproc-per-node 8 -m gradfix.cli.main transport ... --data few.jsonl --out B-ft/

Inside a job, :func:`init_from_environment` starts the process group from torchrun's variables,
:func:`shard` gives each rank its examples and :func:`all_reduce_votes` adds the votes up.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeVar

import torch

from gradfix.errors import GradfixError
from gradfix.ops.signs import count_dtype
from gradfix.votes.estimate import SignVotes

T = TypeVar("T")


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the current process group, ``(0, 1)`` when there is none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_environment(backend: str | None = None) -> bool:
    """Start the default process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1).

    The backend defaults to NCCL when CUDA is available and gloo otherwise. Returns whether a
    process group is active.
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise GradfixError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if chosen == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=chosen)
    return True


def end_process_group(synchronize: bool = True) -> None:
    """Leave the default process group, if one is active.

    With ``synchronize`` every process waits at a barrier first: gloo aborts a process
    ("terminate called without an active exception") when it tears its group down while a peer
    is still working (rank 0 writing the output, the others already done). After an error the
    barrier is skipped, since the other processes may never reach it.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if synchronize and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def shard(items: Sequence[T], rank: int | None = None, world_size: int | None = None) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th item starting at ``rank``."""
    if rank is None or world_size is None:
        rank, world_size = world()
    return list(items[rank::world_size])


def _device(backend: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def all_reduce_votes(votes: SignVotes) -> SignVotes:
    """Sum the votes of every process; each process receives the total.

    Every process must have voted on the same tensor names and shapes, with the same estimator
    and gradient setting (checked). Vote counts are summed as integers, so the result is exactly
    that of one process voting on all examples; gradient sums, when kept, are summed too.
    Without an active process group the votes are returned unchanged.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return votes
    device = _device(dist.get_backend())
    shapes = votes.shapes()
    names = list(shapes)
    layouts: list[object] = [None] * dist.get_world_size()
    layout = (votes.estimator, bool(votes.counts), bool(votes.grad_sum), [(n, shapes[n]) for n in names])
    dist.all_gather_object(layouts, layout)
    if any(other != layout for other in layouts):
        raise GradfixError(
            "processes voted on different tensors, with different estimators or gradient settings"
        )
    header = torch.tensor([votes.num_samples, *[votes.hits.get(n, 0) for n in names]], dtype=torch.int64)
    header = header.to(device)
    dist.all_reduce(header)
    total = int(header[0])
    dtype = count_dtype(total)
    counts, grad_sum = {}, {}
    for name in names:
        if votes.grad_sum:
            g = votes.grad_sum[name].to(device)
            dist.all_reduce(g)
            grad_sum[name] = g.cpu()
        if votes.counts:
            c = votes.counts[name].to(device=device, dtype=torch.int64)
            dist.all_reduce(c)
            counts[name] = c.cpu().to(dtype)
    hits = {n: int(h) for n, h in zip(names, header[1:].tolist(), strict=True)}
    return SignVotes(counts, grad_sum, total, votes.estimator, hits)
