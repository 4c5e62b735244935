"""Votes that are the same bits with any number of threads: kernel, PyTorch kernels, engines."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from tiny_models import make_tiny_bert, topic_examples
from torch.nn import functional as F

from gradfix import SignVotes, estimate_signs
from gradfix.recipes import load_recipe
from gradfix.votes import native
from gradfix.votes.hooks import thread_invariant_kernels

LABELS = ["sports", "business", "tech"]


@pytest.fixture
def restore_threads() -> Iterator[None]:
    """Put torch's thread count back after a test that changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _with_threads(fn: Callable[[], object], counts: tuple[int, ...] = (1, 2, 3)) -> list[object]:
    """``fn()`` run with each number of torch threads (the C kernel takes torch's count)."""
    out = []
    for threads in counts:
        torch.set_num_threads(threads)
        out.append(fn())
    return out


def _flat(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat(v)]
    return []


def _same_bits(results: list[object]) -> bool:
    first = _flat(results[0])
    return all(
        len(_flat(r)) == len(first) and all(torch.equal(a, b) for a, b in zip(first, _flat(r), strict=True))
        for r in results[1:]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vote_kernel_sums_do_not_depend_on_the_thread_count(dtype, restore_threads) -> None:
    if not native.available():
        pytest.skip("no C compiler: the kernel is not used")
    torch.manual_seed(0)
    grads = torch.randn(37, 5000, dtype=dtype) * torch.rand(37, 1, dtype=dtype).pow(6)

    def vote() -> tuple[torch.Tensor, torch.Tensor]:
        grad_sum, counts = torch.full((5000,), 0.25, dtype=dtype), torch.zeros(5000, dtype=torch.int32)
        assert native.add_votes(grads, grad_sum, counts) == 37
        return grad_sum, counts

    results = _with_threads(vote)
    assert _same_bits(results)
    in_sample_order = torch.full((5000,), 0.25, dtype=dtype)
    for row in grads:  # one coordinate, one thread, samples in order: the sequential sum
        in_sample_order += row
    assert torch.equal(_flat(results[0])[0], in_sample_order)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_kernel_sums_do_not_depend_on_the_thread_count(dtype, restore_threads) -> None:
    if not native.available():
        pytest.skip("no C compiler: the kernel is not used")
    torch.manual_seed(1)
    x, g = torch.randn(9, 13, 70, dtype=dtype), torch.randn(9, 13, 45, dtype=dtype)

    def vote() -> tuple[torch.Tensor, torch.Tensor]:
        grad_sum, counts = torch.zeros(45, 70, dtype=dtype), torch.zeros(45, 70, dtype=torch.int16)
        assert native.add_linear_votes(x, g, grad_sum, counts) == 9
        return grad_sum, counts

    assert _same_bits(_with_threads(vote))


def test_thread_dependent_torch_kernels_give_one_thread_results(restore_threads) -> None:
    torch.manual_seed(2)
    scores, grad = torch.randn(8, 2, 13, 13), torch.randn(8, 2, 13, 13)  # 13: not a multiple of 8
    probs = scores.softmax(-1)
    x, w, b, dy = torch.randn(4, 13, 32), torch.randn(32), torch.randn(32), torch.randn(4, 13, 32)

    def kernels() -> list[torch.Tensor]:
        with thread_invariant_kernels():
            soft = torch._softmax_backward_data(grad, probs, -1, torch.float32)
            xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
            y = F.layer_norm(xx, (32,), ww, bb, 1e-12)
            return [soft, *torch.autograd.grad((y * dy).sum(), [xx, ww, bb])]

    assert _same_bits(_with_threads(kernels))
    torch.set_num_threads(1)
    assert torch.equal(kernels()[0], torch._softmax_backward_data(grad, probs, -1, torch.float32))


def test_blas_was_made_reproducible_where_it_is_mkl() -> None:
    if not torch.backends.mkl.is_available():
        pytest.skip("PyTorch without MKL")
    assert native.BLAS_REPRODUCIBLE
    torch.manual_seed(3)
    a, w, bias = torch.randn(10, 32), torch.randn(32, 32), torch.randn(32)  # a linear over 10 tokens
    before = torch.get_num_threads()
    try:
        # 1 and 2 threads (on a machine of two cores, MKL still differs with more threads than cores)
        assert _same_bits(_with_threads(lambda: torch.addmm(bias, a, w.t()), (1, 2)))
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, object, list[dict]]:
    folder = make_tiny_bert(tmp_path_factory.mktemp("threads") / "B", seed=3)
    model, recipe = load_recipe("text-zero-shot", folder, LABELS, max_length=128)
    examples = topic_examples(8, seed=5)[:13]
    batches = [recipe.collate(examples[:8]), recipe.collate(examples[8:12]), recipe.collate(examples[12:])]
    assert any(b["input_ids"].shape[1] % 8 for b in batches)  # attention rows off the vector width
    return model, recipe, batches


@pytest.mark.parametrize(
    ("engine", "estimator"),
    [("auto", "majority"), ("loop", "majority"), ("vmap", "majority"), ("auto", "mean")],
)
def test_votes_are_the_same_bits_with_1_and_2_threads(tiny, engine, estimator, restore_threads) -> None:
    model, recipe, batches = tiny
    results: list[SignVotes] = _with_threads(
        lambda: estimate_signs(model, batches, recipe.loss, estimator, engine=engine, progress=False), (1, 2)
    )
    first = results[0]
    assert first.num_samples == 13
    for other in results[1:]:
        assert other.hits == first.hits
        for name, grad_sum in first.grad_sum.items():
            assert torch.equal(other.grad_sum[name], grad_sum), name
            if first.counts:
                assert torch.equal(other.counts[name], first.counts[name]), name
