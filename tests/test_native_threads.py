"""The vote kernel's work split over threads: no OpenMP runtime, ranges taken as threads come free."""

from __future__ import annotations

import multiprocessing
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch

from gradfix.votes import native
from gradfix.votes.native import threads as pool

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")


def _recorded(units: int, work: int, threads: int) -> tuple[bool, list[tuple[int, int, int]]]:
    calls: list[tuple[int, int, int]] = []
    lock = threading.Lock()

    def call(begin: int, end: int) -> int:
        with lock:
            calls.append((begin, end, threading.get_ident()))
        return 0

    return pool.split_over_threads(call, units, work, threads), calls


@pytest.mark.parametrize(("units", "threads"), [(1, 4), (7, 2), (100, 3), (1000, 2)])
def test_ranges_cover_every_unit_once(units: int, threads: int) -> None:
    done, calls = _recorded(units, work=units * pool.MIN_PIECE_WORK, threads=threads)
    assert done
    covered = sorted(u for begin, end, _ in calls for u in range(begin, end))
    assert covered == list(range(units))
    assert len(calls) == min(units, threads * pool.PIECES_PER_THREAD)


def test_small_work_or_one_thread_runs_in_the_calling_thread() -> None:
    for work, threads in ((10, 4), (10**9, 1)):
        done, calls = _recorded(64, work, threads)
        assert done and [(b, e) for b, e, _ in calls] == [(0, 64)]
        assert calls[0][2] == threading.get_ident()


def test_a_stalled_range_does_not_hold_up_the_others() -> None:
    """The range of a thread that the system deschedules (here: one that waits) is the only one
    left waiting; the other thread takes all the other ranges meanwhile."""
    pieces = 2 * pool.PIECES_PER_THREAD
    others_done = threading.Event()
    done_count = 0
    lock = threading.Lock()
    stalled_threads: list[int] = []

    def call(begin: int, end: int) -> int:
        nonlocal done_count
        if begin == 0:
            stalled_threads.append(threading.get_ident())
            assert others_done.wait(timeout=30), "the other ranges waited for the stalled one"
            return 0
        with lock:
            done_count += 1
            if done_count == pieces - 1:
                others_done.set()
        return 0

    assert pool.split_over_threads(call, pieces, pieces * pool.MIN_PIECE_WORK, 2)
    assert others_done.is_set() and len(stalled_threads) == 1


def test_ranges_run_on_several_threads_at_once() -> None:
    seen: set[int] = set()
    both = threading.Event()
    lock = threading.Lock()

    def call(begin: int, end: int) -> int:
        with lock:
            seen.add(threading.get_ident())
            if len(seen) == 2:
                both.set()
        both.wait(timeout=30)
        return 0

    assert pool.split_over_threads(call, 8, 8 * pool.MIN_PIECE_WORK, 2)
    assert both.is_set()


def test_a_failed_range_is_reported_and_an_error_waits_for_the_other_threads() -> None:
    assert not pool.split_over_threads(lambda b, e: -1 if b == 0 else 0, 8, 8 * pool.MIN_PIECE_WORK, 2)
    running = threading.Event()
    finished: list[int] = []

    def call(begin: int, end: int) -> int:
        if threading.current_thread() is threading.main_thread():
            running.wait(timeout=30)
            raise RuntimeError("stop")
        running.set()
        threading.Event().wait(0.2)
        finished.append(begin)
        return 0

    with pytest.raises(RuntimeError, match="stop"):
        pool.split_over_threads(call, 8, 8 * pool.MIN_PIECE_WORK, 2)
    assert finished  # the helper's range had ended before the error reached the caller


def _split_in_child(queue: multiprocessing.Queue) -> None:
    done, calls = _recorded(16, 16 * pool.MIN_PIECE_WORK, 2)
    queue.put((done, sorted(u for b, e, _ in calls for u in range(b, e))))


@pytest.mark.skipif(sys.platform != "linux", reason="fork")
def test_a_forked_child_gets_its_own_threads() -> None:
    assert _recorded(16, 16 * pool.MIN_PIECE_WORK, 2)[0]  # the parent's pool exists
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_split_in_child, args=(queue,))
    child.start()
    result = queue.get(timeout=60)
    child.join(timeout=60)
    assert result == (True, list(range(16)))


@needs_compiler
def test_the_kernel_brings_no_openmp_runtime() -> None:
    assert native.available()
    lib = native._library()
    assert lib is not None
    built = Path(lib._name).read_bytes()
    assert b"libgomp" not in built and b"GOMP_" not in built and b"omp_get" not in built


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_any_cut_into_ranges_gives_the_same_bits(dtype, monkeypatch) -> None:
    """Ranges of one unit each (cutting the linear kernel's tile groups and row blocks anywhere)
    against one range: the same sums, counts and hits."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 7, 150, generator=g, dtype=dtype)
    grad_out = torch.randn(5, 7, 61, generator=g, dtype=dtype)
    grad_out[2] = 0.0
    grads = torch.randn(6, 5000, generator=g, dtype=dtype)

    def votes(threads: int) -> list[object]:
        torch.set_num_threads(threads)
        sums, counts = torch.zeros(61, 150, dtype=dtype), torch.zeros(61, 150, dtype=torch.int16)
        flat_sums, flat_counts = torch.zeros(5000, dtype=dtype), torch.zeros(5000, dtype=torch.int32)
        linear_hits = native.add_linear_votes(x, grad_out, sums, counts)
        hits = (linear_hits, native.add_votes(grads, flat_sums, flat_counts))
        return [hits, sums, counts, flat_sums, flat_counts]

    before = torch.get_num_threads()
    try:
        one = votes(1)
        monkeypatch.setattr(pool, "MIN_PIECE_WORK", 1)
        monkeypatch.setattr(pool, "PIECES_PER_THREAD", 10**6)
        cut = votes(3)
    finally:
        torch.set_num_threads(before)
    assert one[0] == cut[0] == (4, 6)
    for a, b in zip(one[1:], cut[1:], strict=True):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
