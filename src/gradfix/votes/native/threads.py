"""Ranges of the vote kernel's work handed out to a few threads, several ranges per thread.

The C kernel has no threads of its own. Its work is a number of independent units (column
blocks, register tiles); :func:`split_over_threads` cuts them into a few more ranges than
threads and lets the calling thread and up to ``threads - 1`` pool threads take the ranges one
at a time until none is left. On a machine whose cores other programs also use, a thread that
the system deschedules holds up only the range it is in (the others take the rest), and a
thread with nothing left to do waits asleep on a lock, never spinning: the kernel's threads
cannot take CPU time from PyTorch's or from each other. :mod:`ctypes` releases the GIL while the
C function runs, so the ranges do run at the same time.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

PIECES_PER_THREAD = 4
"""Ranges per thread: a descheduled thread's range is at most about 1/4 of its fair share."""

MIN_PIECE_WORK = 2**17
"""Below this much work per range (values read or multiply-adds), fewer ranges are made: waking a
pool thread costs tens of microseconds."""

_pool: ThreadPoolExecutor | None = None
_pool_owner = (0, 0)  # (process id, size) the pool was made for: a forked child makes its own
_pool_lock = threading.Lock()


def _helpers(size: int) -> ThreadPoolExecutor:
    """A pool of at least ``size`` threads in this process (made or grown on demand)."""
    global _pool, _pool_owner
    with _pool_lock:
        pid = os.getpid()
        if _pool is None or _pool_owner[0] != pid or _pool_owner[1] < size:
            if _pool is not None and _pool_owner[0] == pid:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="gradfix-votes")
            _pool_owner = (pid, size)
        return _pool


def piece_count(units: int, work: int, threads: int) -> int:
    """How many ranges to cut ``units`` units of ``work`` in all into, for ``threads`` threads."""
    if threads <= 1 or units <= 1:
        return 1
    return max(1, min(units, threads * PIECES_PER_THREAD, work // MIN_PIECE_WORK))


def split_over_threads(call: Callable[[int, int], int], units: int, work: int, threads: int) -> bool:
    """Run ``call(begin, end)`` over ranges covering ``[0, units)`` on up to ``threads`` threads.

    ``call`` must be safe to run on disjoint ranges at the same time (the kernel's functions are)
    and returns 0 on success. The ranges are taken in order as threads come free; the calling
    thread takes its part. Returns whether every call returned 0. Returns only once no call is
    running any more, also when one raises (the caller's tensors stay in use until then).
    """
    pieces = piece_count(units, work, threads)
    if pieces == 1:
        return call(0, units) == 0
    bounds = [units * i // pieces for i in range(pieces + 1)]
    taken = itertools.count()  # next() is atomic under the GIL
    stop = threading.Event()

    def take() -> bool:
        ok = True
        while not stop.is_set() and (i := next(taken)) < pieces:
            ok = call(bounds[i], bounds[i + 1]) == 0 and ok
        return ok

    pool = _helpers(threads - 1)
    helpers: list[Future[bool]] = [pool.submit(take) for _ in range(min(threads, pieces) - 1)]
    try:
        ok = take()
    finally:
        stop.set()
        wait(helpers)
    return all([f.result() for f in helpers]) and ok
