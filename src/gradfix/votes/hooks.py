"""The ``hooks`` engine: per-sample gradients from one batched forward and backward.

Forward hooks record each covered module's input and output; during the backward, a hook on each
recorded output passes its gradient to the rule registered for that module's type
(:mod:`gradfix.votes.layers`), which forms its per-sample parameter gradients
(``∂ℓ_b/∂W = Σ_t δ_{b,t} x_{b,t}ᵀ`` for a linear layer) and hands them to the sink, layer by
layer, while the backward goes on.

:func:`gradfix.votes.estimate_signs` runs every engine under :class:`thread_invariant_kernels`, so
that the per-sample gradients (and the vote sums added from them) are the same bits whatever the
number of threads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gradfix.votes.layers import covering_rule, module_sums
from gradfix.votes.per_sample import GradientSink, LossFn, Workspace, batch_size, check_losses

# -- thread-count-independent kernels -------------------------------------------------------------
_aten = torch.ops.aten


def _affine_grads_asked(args: tuple[Any, ...]) -> bool:
    """Whether a ``native_layer_norm_backward`` call asks for the weight or bias gradient."""
    mask = args[-1] if args else None
    return not isinstance(mask, (list, tuple)) or len(mask) < 3 or bool(mask[1] or mask[2])


_THREAD_DEPENDENT: dict[Any, Any] = {
    # rows whose length is not a multiple of the vector width round differently with 1 or more threads
    _aten._softmax_backward_data.default: None,
    # the weight and bias gradients are summed over rows in one part per thread (the input's is not)
    _aten.native_layer_norm_backward.default: _affine_grads_asked,
}
"""PyTorch CPU kernels whose results change in the last bits with the number of threads (found
by running each with 1 and 2 threads: embedding backward, batch and group norms, convolutions,
log-softmax, reductions over a sample's tokens and element-wise ops gave the same bits; matrix
products are MKL's, made reproducible by :func:`gradfix.votes.native.reproducible_blas`), with an
optional test of the call's arguments."""


class thread_invariant_kernels(TorchDispatchMode):  # used like a function: ``with …():``
    """Within the block, the CPU kernels whose rounding depends on the thread count run on one thread.

    PyTorch's CPU softmax backward (on rows whose length is not a multiple of the vector width:
    attention over most sequence lengths) and layer-norm backward (its weight and bias gradients)
    give results that differ in the last bits between 1 and 2 threads, which would make the
    per-sample gradients, and so the vote sums and the descent figures read from them, depend on
    the thread count. Those calls (:data:`_THREAD_DEPENDENT`) are run with one thread, which is
    also what a one-thread run computes; every other operation runs as usual. The cost is small:
    those kernels are a few percent of a backward, and every other operation passes through this
    mode's Python dispatch once.
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _THREAD_DEPENDENT:
            test = _THREAD_DEPENDENT[func]
            threads = torch.get_num_threads()
            if threads > 1 and (test is None or test(args)) and _on_cpu(args):
                torch.set_num_threads(1)
                try:
                    return func(*args, **kwargs)
                finally:
                    torch.set_num_threads(threads)
        return func(*args, **kwargs)


def _on_cpu(args: tuple[Any, ...]) -> bool:
    """Whether the first tensor among ``args`` is on the CPU."""
    for arg in args:
        if isinstance(arg, Tensor):
            return arg.device.type == "cpu"
    return False


# -- hooks --------------------------------------------------------------------------------------
def hooked_parameters(model: nn.Module, params: Mapping[str, Tensor]) -> dict[nn.Module, dict[str, str]]:
    """``{module: {"weight"/"bias": parameter name}}`` for the parameters the hook engine covers.

    Covered: the parameters a module's layer rule computes (:func:`gradfix.votes.layers.covering_rule`:
    a registered layer type, or a subclass that keeps its ``forward``), owned by that module alone
    and used by no other module.
    """
    name_of = {id(p): n for n, p in params.items()}
    owners: dict[int, int] = {}
    for module in model.modules():
        for _, p in module.named_parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    covered: dict[nn.Module, dict[str, str]] = {}
    for module in model.modules():
        rule = covering_rule(module)
        if rule is None:
            continue
        own = {
            k: name_of[id(p)]
            for k, p in module.named_parameters(recurse=False)
            if id(p) in name_of and owners[id(p)] == 1 and k in rule.parameters
        }
        if own:
            covered[module] = own
    return covered


class _OutsideUse(TorchFunctionMode):
    """Records covered parameters that a torch function receives outside their module's call."""

    def __init__(self, owner: Mapping[int, tuple[nn.Module, str]], active: Mapping[nn.Module, int]):
        super().__init__()
        self.owner, self.active = owner, active
        self.outside: set[str] = set()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        for leaf in tree_flatten((args, kwargs))[0]:
            if isinstance(leaf, Tensor):
                entry = self.owner.get(id(leaf))
                if entry is not None and not self.active.get(entry[0]):
                    self.outside.add(entry[1])
        return func(*args, **kwargs)


class outside_use:  # used like a function: ``with outside_use(covered) as found``
    """Within the block, collect the names of covered parameters used outside their module.

    The hook engine sees a parameter only through its own module's calls; a parameter that also
    enters a computation elsewhere (a tied or directly used weight) needs another engine. Every
    torch function called in the block is inspected (a :class:`~torch.overrides.TorchFunctionMode`)
    while forward pre/post hooks track which covered modules are running: a covered parameter
    passed to a function while its module is not running is reported. ``found`` (also what
    ``with`` gives) is filled when the block ends.
    """

    def __init__(self, covered: Mapping[nn.Module, Mapping[str, str]]):
        self.covered = covered
        self.found: set[str] = set()

    def __enter__(self) -> set[str]:
        params = {
            id(p): (m, names[k])
            for m, names in self.covered.items()
            for k, p in m.named_parameters(recurse=False)
            if k in names
        }
        active: dict[nn.Module, int] = {}

        def enter(module: nn.Module, *_: Any) -> None:
            active[module] = active.get(module, 0) + 1

        def leave(module: nn.Module, *_: Any) -> None:
            active[module] -= 1

        self._handles = [m.register_forward_pre_hook(enter) for m in self.covered]
        self._handles += [m.register_forward_hook(leave, always_call=True) for m in self.covered]
        self._mode = _OutsideUse(params, active)
        self._mode.__enter__()
        return self.found

    def __exit__(self, *exc: object) -> None:
        try:
            self._mode.__exit__(*exc)
        finally:
            for h in self._handles:
                h.remove()
            self.found.update(self._mode.outside)


def hook_gradients(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    loss_fn: LossFn,
    sink: GradientSink,
    covered: Mapping[nn.Module, Mapping[str, str]],
    workspace: Workspace | None = None,
    watch: AbstractContextManager[Any] | None = None,
) -> set[nn.Module]:
    """Per-sample gradients of the ``covered`` parameters from one batched forward and backward.

    ``watch`` (e.g. :func:`outside_use`) is entered around the forward pass only.

    Returns the modules that could not be handled per sample because a call did not carry the
    sample axis first (e.g. position embeddings broadcast over the batch); the caller must
    compute their parameters' gradients another way. A lookup (a rule with ``expand_broadcast``)
    whose ids are not held by a tensor of the batch and whose first axis is as long as the
    batch may be a lookup shared over the batch all the same: :func:`shared_over_batch` tells
    (one more backward pass, only then).
    """
    calls: list[tuple[nn.Module, Tensor, Tensor]] = []
    size = batch_size(batch)
    expand = {m for m in covered if (rule := covering_rule(m)) is not None and rule.expand_broadcast}
    held = {_storage(t) for t in tree_flatten(batch)[0] if isinstance(t, Tensor)}
    unsure: list[int] = []  # the calls of lookups whose ids do not come from the batch

    def record(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor | None:
        x = inputs[0]
        replaced = None
        if module in expand and x.dim() > 0 and x.shape[0] == 1 and size > 1:
            # a lookup done once and broadcast over the batch (position ids): give each sample
            # its own copy, so that each sample's output gradient stays separate
            x = x.expand(size, *x.shape[1:])
            replaced = output = output.expand(size, *output.shape[1:])
            if not output.requires_grad:
                replaced = output = output.clone()
        elif module in expand and _storage(x) not in held:
            unsure.append(len(calls))
        if not output.requires_grad:
            output.requires_grad_()
        # a module moved by a device hook (device_map) is given its input on another device
        calls.append((module, x.detach().to(output.device), output))
        return replaced

    flags = {n: p.requires_grad for n, p in params.items()}
    handles = [m.register_forward_hook(record) for m in covered]
    try:
        for p in params.values():
            p.requires_grad_(False)
        with watch if watch is not None else nullcontext():
            losses = check_losses(loss_fn(model, batch), batch_size(batch))
    finally:
        for h in handles:
            h.remove()
        for n, p in params.items():
            p.requires_grad_(flags[n])
    broadcast = {m for m, x, out in calls if x.dim() == 0 or x.shape[0] != size or out.shape[0] != size}
    broadcast |= shared_over_batch(losses, [calls[i] for i in unsure if calls[i][0] not in broadcast])
    records = [r for r in calls if r[0] not in broadcast]
    calls.clear()
    if not records:
        return broadcast
    _backward_into(losses.sum(), records, covered, sink, workspace or Workspace())
    return broadcast


def _storage(t: Tensor) -> int | None:
    """The address of the memory that holds ``t`` (``None`` for a tensor without storage)."""
    try:
        return int(t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return None


def shared_over_batch(losses: Tensor, records: list[tuple[nn.Module, Tensor, Tensor]]) -> set[nn.Module]:
    """The modules of ``records`` with a call whose output rows are not each one sample's alone.

    A call made once for the whole batch can have a first axis as long as the batch by chance
    (T5's relative attention bias is looked up for a ``[query, key]`` grid and broadcast over the
    batch: with as many tokens as samples, it looks per-sample). With two samples or more, the
    backward of the even
    samples' losses ``Σ_b ℓ_{2b}`` gives the odd rows of a per-sample output exactly zero
    gradient, while a call shared over the batch gets, in its odd rows, the gradient of the even
    samples' use of them. (Odd rows rather than row 0: a causal decoder's first query attends to
    one key only, so its row of the bias gets no gradient from any sample.) The graph is kept for
    the backward that follows.
    """
    even = losses[0::2].sum()
    if losses.shape[0] < 2 or not records or even.grad_fn is None:
        return set()
    shared: set[nn.Module] = set()

    def check(index: int, g: Tensor) -> None:
        if bool(g[1::2].ne(0).any()):
            shared.add(records[index][0])

    _hooked_backward(even, [out for _, _, out in records], check, retain_graph=True)
    return shared


def _backward_into(
    loss: Tensor,
    records: list[tuple[nn.Module, Tensor, Tensor]],
    covered: Mapping[nn.Module, Mapping[str, str]],
    sink: GradientSink,
    ws: Workspace,
) -> None:
    """Backward pass whose recorded output gradients are turned into per-sample sums as they come.

    A hook on each recorded output hands its gradient to the module's sums as soon as the
    backward has computed it (once all of a module's calls have theirs), so no output gradient is
    kept past its layer: memory stays that of an ordinary backward, reused and warm in cache. The
    backward is asked for the gradients of the recorded outputs that are leaves (modules whose
    input needs no gradient, such as embeddings), which reaches every output the loss depends on
    through them; outputs not reached that way are asked for in a second backward.
    """
    if loss.grad_fn is None:  # the loss depends on no recorded output: no gradient, no vote
        return
    expected: dict[nn.Module, int] = {}
    for module, _, _ in records:
        expected[module] = expected.get(module, 0) + 1
    pending: dict[nn.Module, list[tuple[Tensor, Tensor]]] = {}
    fired: set[int] = set()

    def consume(index: int, g: Tensor) -> None:
        if index in fired:  # reached again by the second backward
            return
        fired.add(index)
        module, x, _ = records[index]
        got = pending.setdefault(module, [])
        got.append((x, g.detach()))
        if len(got) == expected[module]:
            del pending[module]
            module_sums(module, got, covered[module], sink, ws)

    _hooked_backward(loss, [out for _, _, out in records], consume)
    for module, got in pending.items():  # calls whose output the loss does not depend on
        module_sums(module, got, covered[module], sink, ws)


def _hooked_backward(
    loss: Tensor, outputs: list[Tensor], hook: Callable[[int, Tensor], None], retain_graph: bool = False
) -> None:
    """Backward of ``loss`` that calls ``hook(i, gradient)`` as the gradient of ``outputs[i]`` is made.

    Only the outputs that are leaves are asked for (their gradients are held until the end; the
    others are handed to ``hook`` and dropped), then, in a second backward, the outputs that the
    first does not reach (:func:`_off_root_paths`); ``hook`` may thus see an output twice.
    """
    roots = [out for out in outputs if out.grad_fn is None]
    missing = _off_root_paths(loss, outputs, roots)
    handles = [out.register_hook(partial(hook, i)) for i, out in enumerate(outputs)]
    try:
        if roots:
            keep = bool(missing) or retain_graph
            torch.autograd.grad(loss, roots, allow_unused=True, retain_graph=keep)
        if missing:
            rest = [outputs[i] for i in missing]
            torch.autograd.grad(loss, rest, allow_unused=True, retain_graph=retain_graph)
    finally:
        for h in handles:
            h.remove()


def _off_root_paths(loss: Tensor, outputs: list[Tensor], roots: list[Tensor]) -> list[int]:
    """Indices of the non-leaf ``outputs`` that the loss depends on but not through any of ``roots``.

    A backward asked for the gradients of ``roots`` runs exactly the graph nodes that lead from
    the loss to them, so these outputs would get no gradient from it (a walk of the graph, no
    arithmetic).
    """
    if loss.grad_fn is None:
        return []
    root_ids = {id(t) for t in roots}
    leads: dict[Any, bool] = {}  # node -> it leads to a root
    stack: list[tuple[Any, bool]] = [(loss.grad_fn, False)]
    while stack:
        node, expanded = stack.pop()
        children = [n for n, _ in node.next_functions if n is not None]
        if expanded:
            variable = getattr(node, "variable", None)
            leads[node] = (variable is not None and id(variable) in root_ids) or any(
                leads[n] for n in children
            )
        elif node not in leads:
            leads[node] = False  # in progress (a graph has no cycle: never read before it is set)
            stack.append((node, True))
            stack.extend((n, False) for n in children if n not in leads)
    return [i for i, out in enumerate(outputs) if out.grad_fn is not None and leads.get(out.grad_fn) is False]
