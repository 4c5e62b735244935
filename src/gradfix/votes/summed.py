"""The gradient of the summed loss, handed over one tensor at a time (never the whole model's).

Majority votes taken with ``gradient="none"`` (:func:`gradfix.votes.estimate_signs`) hold only
their counts. What needs the mean gradient ``ḡ`` afterwards (the descent report ``⟨ḡ, Δ⟩``)
gets it from :func:`summed_gradients`: one ordinary batched backward of the summed loss per
batch, exact for ``Σ_j g^(j)`` up to the order of float additions, in which each parameter's
gradient is passed to a consumer as soon as autograd has accumulated it and dropped at once. A
consumer that reduces it (an inner product per tensor) holds no model-sized float32 gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from gradfix.errors import GradfixError
from gradfix.votes.hooks import thread_invariant_kernels
from gradfix.votes.per_sample import LossFn, batch_size, check_losses

Consumer = Callable[[str, Tensor], None]
"""``consume(parameter name, gradient of the summed loss of one batch)``."""


def summed_gradients(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn, consume: Consumer) -> int:
    """For each batch, one backward of ``Σ_b ℓ_b``, each parameter's gradient handed to ``consume``.

    Only parameters with ``requires_grad`` take part; a parameter the loss does not reach is not
    handed over for that batch. The gradient given to ``consume`` is only valid during the call
    (it is released right after: keep a reduction or a copy). The model is in eval mode during
    the passes (restored afterwards), its ``.grad`` fields are left as they were, and the passes
    run under :class:`~gradfix.votes.hooks.thread_invariant_kernels`. Returns the number of samples.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise GradfixError("the model has no parameter with requires_grad=True")
    saved = {n: p.grad for n, p in params.items()}
    handles = []

    def hand_over(name: str) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:
            if param.grad is not None:
                consume(name, param.grad)
            param.grad = None

        return hook

    was_training = model.training
    model.eval()
    samples = 0
    try:
        for name, p in params.items():
            p.grad = None
            handles.append(p.register_post_accumulate_grad_hook(hand_over(name)))
        for batch in batches:
            size = batch_size(batch)
            with thread_invariant_kernels():
                loss = check_losses(loss_fn(model, batch), size).sum()
                if loss.requires_grad:
                    loss.backward()
            samples += size
    finally:
        for h in handles:
            h.remove()
        for name, p in params.items():
            p.grad = saved[name]
        model.train(was_training)
    return samples
