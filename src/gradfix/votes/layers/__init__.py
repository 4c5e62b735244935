"""Per-layer rules of the ``hooks`` engine, registered by module type.

A rule turns the calls of one module (each call's input ``x`` ``[b, …]`` and output gradient
``δ`` ``[b, …]``) into the per-sample gradients of that module's parameters and hands them to a
:class:`~gradfix.votes.per_sample.GradientSink`. Each layer type has its own file in this package
that registers its rule with :func:`register_layer_rule` (every module of the package is imported
here, so adding a layer type is adding a file):

- :mod:`~gradfix.votes.layers.linear`: ``nn.Linear``;
- :mod:`~gradfix.votes.layers.layer_norm`: ``nn.LayerNorm``;
- :mod:`~gradfix.votes.layers.embedding`: ``nn.Embedding``;
- :mod:`~gradfix.votes.layers.conv2d`: ``nn.Conv2d``;
- :mod:`~gradfix.votes.layers.clip_embeddings`: the class token of ``transformers``' CLIP image
  embeddings.

A layer type of a library that gradfix does not import is registered by its import path
(``"package.module.Class"``), so that registering its rule imports nothing.

A module is covered by the rule of the nearest class of its MRO that has one
(:func:`rule_for`), provided it computes what that class computes: a subclass that overrides
``forward`` is not covered (:func:`covering_rule`), and its parameters go to the loop engine.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from gradfix.votes.per_sample import GradientSink, Workspace

Calls = list[tuple[Tensor, Tensor]]
"""The calls of one module in a batch: ``(input, output gradient)``, in call order."""
SumsFn = Callable[[nn.Module, Calls, Mapping[str, str], GradientSink, Workspace], None]
"""``sums(module, calls, names, sink, workspace)``: hand the per-sample gradients of the
parameters in ``names`` (``{"weight": parameter name, …}``) to the sink."""


@dataclass(frozen=True)
class LayerRule:
    """How the ``hooks`` engine forms the per-sample gradients of one layer type.

    - ``module_type``: the class the rule was registered for, or its import path;
    - ``sums``: the rule itself (see :data:`SumsFn`);
    - ``parameters``: the parameters (by attribute name) the rule computes;
    - ``covers``: whether a given module of that type can be handled (e.g. an embedding with
      ``max_norm`` cannot); ``None``: every module;
    - ``expand_broadcast``: a call whose input has a sample axis of 1 while the batch has more
      samples (a lookup shared by the batch, such as position ids) is expanded over the batch,
      so that each sample's output gradient stays separate.
    """

    module_type: type[nn.Module] | str
    sums: SumsFn
    parameters: tuple[str, ...] = ("weight", "bias")
    covers: Callable[[nn.Module], bool] | None = None
    expand_broadcast: bool = False


LAYER_RULES: dict[type[nn.Module] | str, LayerRule] = {}
"""The registered rules, by module type or its import path (filled by the modules of this package)."""


def type_path(cls: type) -> str:
    """The import path ``"package.module.Class"`` a class can be registered under."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _registered(cls: type) -> LayerRule | None:
    """The rule registered for exactly ``cls``, by the class itself or by its import path."""
    return LAYER_RULES.get(cls) or LAYER_RULES.get(type_path(cls))


def register_layer_rule(
    *module_types: type[nn.Module] | str,
    parameters: tuple[str, ...] = ("weight", "bias"),
    covers: Callable[[nn.Module], bool] | None = None,
    expand_broadcast: bool = False,
) -> Callable[[SumsFn], SumsFn]:
    """Decorator registering ``sums`` as the rule of ``module_types`` (see :class:`LayerRule`).

    A type may be given by its import path (``"transformers.models.clip.modeling_clip.X"``):
    the rule then applies to the class of that path once something imports it. Registering a
    type again replaces its rule. The decorated function is returned unchanged.
    """
    if not module_types:
        raise TypeError("register_layer_rule needs at least one module type")
    for module_type in module_types:
        if isinstance(module_type, str):
            if "." not in module_type.strip(".") or not module_type.isprintable():
                raise TypeError(f"register_layer_rule: {module_type!r} is not an import path")
        elif not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
            raise TypeError(f"register_layer_rule: {module_type!r} is not an nn.Module subclass")

    def register(sums: SumsFn) -> SumsFn:
        for module_type in module_types:
            LAYER_RULES[module_type] = LayerRule(
                module_type, sums, tuple(parameters), covers, expand_broadcast
            )
        return sums

    return register


def rule_for(module: nn.Module | type[nn.Module]) -> LayerRule | None:
    """The rule of the nearest class in the MRO of ``module`` (an instance or a class) that has one."""
    cls = module if isinstance(module, type) else type(module)
    for base in cls.__mro__:
        rule = _registered(base)
        if rule is not None:
            return rule
    return None


def covering_rule(module: nn.Module) -> LayerRule | None:
    """The rule that covers ``module`` in the ``hooks`` engine, or ``None`` (its parameters go to the loop).

    Only a module whose own class is registered is covered: a subclass of a registered type may
    compute something else, or have its weight used by its parent outside its ``forward`` (as
    ``nn.MultiheadAttention`` does with its ``out_proj``), so it goes to the loop unless its class
    is registered too. A module whose ``forward`` is replaced on the instance (other than by
    ``accelerate``'s device hook, :func:`moves_devices_only`), or that the rule's ``covers``
    refuses, goes to the loop as well.
    """
    rule = _registered(type(module))
    if rule is None:
        return None
    if "forward" in vars(module) and not moves_devices_only(module):
        return None
    if rule.covers is not None and not rule.covers(module):
        return None
    return rule


def moves_devices_only(module: nn.Module) -> bool:
    """Whether ``module.forward`` is replaced on the instance only by ``accelerate``'s device hook.

    A model spread over devices (``from_pretrained(..., device_map=...)``, ``dispatch_model``)
    may have ``accelerate``'s ``AlignDevicesHook`` wrapped around a module's own ``forward``: it
    moves the inputs to the module's device (and back) and computes the same, so the module's
    rule still applies (the rule moves the recorded input beside the output gradient). A hook
    that offloads weights, or any other replacement of ``forward``, does not qualify.
    """
    hook = getattr(module, "_hf_hook", None)
    original = getattr(module, "_old_forward", None)
    return (
        type(hook).__name__ == "AlignDevicesHook"
        and not getattr(hook, "offload", True)
        and getattr(original, "__func__", None) is type(module).forward
    )


def module_sums(
    module: nn.Module,
    calls: Calls,
    names: Mapping[str, str],
    sink: GradientSink,
    ws: Workspace,
) -> None:
    """Hand the per-sample gradients of one module's parameters (from its calls) to the sink."""
    rule = rule_for(module)
    if rule is None:
        raise TypeError(f"no per-layer rule is registered for {type(module).__name__}")
    rule.sums(module, calls, names, sink, ws)


def _import_rules() -> None:
    """Import every module of this package, each of which registers its rules."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_rules()

__all__ = [
    "LAYER_RULES",
    "Calls",
    "LayerRule",
    "SumsFn",
    "covering_rule",
    "module_sums",
    "moves_devices_only",
    "register_layer_rule",
    "rule_for",
    "type_path",
]
