"""Permutation specs: which tensor axes share one permutation (TransFusion) or one space (Theseus).

A :class:`PermutationSpec` maps each *group* to the ``(tensor, axis)`` places where its units
live; :class:`HeadSet` marks groups split into attention heads. The builders write the spec of a
known layout (:func:`mlp_spec`, :func:`bert_spec`); :func:`spec_for_state_dict` and
:func:`spec_for_module` detect it from a state dict or a model; :func:`present_spec` restricts a
spec to the tensors two state dicts share. Weight matching (:mod:`gradfix.methods.transfusion`)
and Theseus (:mod:`gradfix.methods.theseus`) both read their spaces from here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from gradfix.errors import ConfigError, MismatchError

Axis = tuple[str, int]
"""``(tensor name, axis)``: one place where a group's units live."""
StateDict = Mapping[str, Tensor]
"""A state dict or a task vector: ``{name: tensor}``."""

_NORM_LEAVES = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class HeadSet:
    """Groups whose axes are split into ``num_heads`` contiguous heads that move together.

    Attention heads: the query/key group and the value/output group of one layer share the head
    permutation ``σ``; each keeps its own permutation within a head, so a group's permutation is
    ``p[j·d + i] = σ(j)·d + ρ_j(i)`` with ``d`` the head dimension.
    """

    groups: tuple[str, ...]
    num_heads: int


@dataclass
class PermutationSpec:
    """``{group: ((tensor, axis), ...)}``: the tensor axes that share one permutation (or space).

    Axes of tensors outside the spec are never permuted (model inputs and outputs).
    ``head_sets`` marks groups that are split into attention heads.
    """

    groups: dict[str, tuple[Axis, ...]]
    head_sets: dict[str, HeadSet] = field(default_factory=dict)
    _by_tensor: dict[str, dict[int, str]] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.groups = {g: tuple((str(t), int(a)) for t, a in axes) for g, axes in self.groups.items()}
        for group, axes in self.groups.items():
            for tensor, axis in axes:
                owner = self._by_tensor.setdefault(tensor, {}).get(axis)
                if owner is not None:
                    raise ConfigError(f"axis {axis} of {tensor} is in two groups: {owner!r} and {group!r}")
                self._by_tensor[tensor][axis] = group
        seen: set[str] = set()
        for name, hs in self.head_sets.items():
            unknown = [g for g in hs.groups if g not in self.groups]
            if unknown or hs.num_heads < 1 or seen & set(hs.groups):
                raise ConfigError(f"head set {name!r} is invalid ({list(hs.groups)}, {hs.num_heads} heads)")
            seen |= set(hs.groups)

    def axes_of(self, tensor: str) -> dict[int, str]:
        """``{axis: group}`` for one tensor (empty when the tensor is outside the spec)."""
        return dict(self._by_tensor.get(tensor, {}))

    def tensor_names(self) -> list[str]:
        """Every tensor named by the spec, in order of first appearance."""
        return list(self._by_tensor)

    def head_set_of(self, group: str) -> HeadSet | None:
        """The head set that contains ``group``, if any."""
        return next((hs for hs in self.head_sets.values() if group in hs.groups), None)

    def restrict(self, names: Iterable[str]) -> PermutationSpec:
        """The spec without the tensors outside ``names`` (groups left empty are dropped)."""
        keep = set(names)
        groups = {g: tuple(a for a in axes if a[0] in keep) for g, axes in self.groups.items()}
        groups = {g: axes for g, axes in groups.items() if axes}
        heads = {}
        for name, hs in self.head_sets.items():
            left = tuple(g for g in hs.groups if g in groups)
            if left:
                heads[name] = HeadSet(left, hs.num_heads)
        return PermutationSpec(groups, heads)

    def sizes(self, tensors: StateDict) -> dict[str, int]:
        """``{group: number of units}``; every axis of a group must have the same length."""
        sizes: dict[str, int] = {}
        for group, axes in self.groups.items():
            lengths = {f"{t}[{a}]": tensors[t].shape[a] for t, a in axes if t in tensors}
            if len(set(lengths.values())) > 1:
                detail = ", ".join(f"{k}={v}" for k, v in lengths.items())
                raise MismatchError(f"group {group!r}: axes have different lengths ({detail})")
            if lengths:
                sizes[group] = next(iter(lengths.values()))
        for name, hs in self.head_sets.items():
            bad = [g for g in hs.groups if g in sizes and sizes[g] % hs.num_heads]
            if bad:
                raise ConfigError(f"head set {name!r}: {bad[0]!r} does not split into {hs.num_heads} heads")
        return sizes


# -- spec builders ------------------------------------------------------------------------------
def mlp_spec(layers: Sequence[str], norms: Mapping[str, int] | None = None) -> PermutationSpec:
    """Spec of a chain of linear layers ``y_k = W_k x_{k-1} + b_k`` (elementwise functions between).

    ``layers`` are the module prefixes of the linear layers in order (``"0"``, ``"fc2"``, ...);
    ``norms`` maps a norm module's prefix (LayerNorm, BatchNorm) to the index ``k`` of the layer
    whose output it normalises. Group ``hidden.k`` is the output of layer ``k`` and the input of
    layer ``k+1``: ``{W_k[0], b_k[0], norm tensors[0], W_{k+1}[1]}``. The network's input and output
    are not permuted.
    """
    groups: dict[str, tuple[Axis, ...]] = {}
    for k in range(len(layers) - 1):
        axes: list[Axis] = [(f"{layers[k]}.weight", 0), (f"{layers[k]}.bias", 0)]
        axes += [(f"{p}.{leaf}", 0) for p, i in (norms or {}).items() if i == k for leaf in _NORM_LEAVES]
        axes.append((f"{layers[k + 1]}.weight", 1))
        groups[f"hidden.{k}"] = tuple(axes)
    return PermutationSpec(groups)


def bert_spec(
    num_layers: int, num_heads: int, prefix: str = "", *, pooler: bool = True, classifier: str | None = None
) -> PermutationSpec:
    """Spec of a BERT-like encoder (``BertModel`` names, optionally under ``prefix``, e.g. ``"bert."``).

    Groups: ``residual`` (embeddings, every LayerNorm, every input projection's columns and output
    projection's rows, the pooler's columns), per layer ``layer.{i}.qk`` (query and key rows:
    ``q·k`` is unchanged when both rows move together within a head), ``layer.{i}.vo`` (value rows
    and the attention output projection's columns), ``layer.{i}.ffn`` (intermediate units) and
    ``pooler`` (pooler units and, when given, the columns of the ``classifier`` that reads them).
    Head set ``layer.{i}.heads`` ties ``qk`` and ``vo`` to one head permutation.
    """

    def rows(*modules: str) -> list[Axis]:  # weight rows and bias of each module
        return [(f"{m}.{leaf}", 0) for m in modules for leaf in ("weight", "bias")]

    p, groups, heads = prefix, {}, {}
    res = [(f"{p}embeddings.{e}_embeddings.weight", 1) for e in ("word", "position", "token_type")]
    res += rows(f"{p}embeddings.LayerNorm")
    for i in range(num_layers):
        q = f"{p}encoder.layer.{i}."
        att, out = f"{q}attention.self.", f"{q}attention.output."
        res += [(f"{att}{m}.weight", 1) for m in ("query", "key", "value")]
        res.append((f"{q}intermediate.dense.weight", 1))
        res += rows(f"{out}dense", f"{out}LayerNorm", f"{q}output.dense", f"{q}output.LayerNorm")
        groups[f"layer.{i}.qk"] = tuple(rows(f"{att}query", f"{att}key"))
        groups[f"layer.{i}.vo"] = (*rows(f"{att}value"), (f"{out}dense.weight", 1))
        groups[f"layer.{i}.ffn"] = (*rows(f"{q}intermediate.dense"), (f"{q}output.dense.weight", 1))
        heads[f"layer.{i}.heads"] = HeadSet((f"layer.{i}.qk", f"layer.{i}.vo"), num_heads)
    if pooler:
        res.append((f"{p}pooler.dense.weight", 1))
        groups["pooler"] = (*rows(f"{p}pooler.dense"), *([(f"{classifier}.weight", 1)] if classifier else []))
    return PermutationSpec({"residual": tuple(res), **groups}, heads)


_BERT_QUERY = re.compile(r"^(?P<prefix>(?:.+\.)?)encoder\.layer\.(?P<i>\d+)\.attention\.self\.query\.weight$")


def spec_for_state_dict(state_dict: StateDict, num_heads: int | None = None) -> PermutationSpec:
    """Detect the layout of a state dict: a BERT-like encoder, else a chain of linear layers.

    BERT-like: ``{prefix}encoder.layer.{i}.attention.self.query.weight`` names (``num_heads`` is
    required: a state dict does not record it); a top-level ``classifier`` reading the pooler is
    allowed. MLP: modules in state-dict order, each a linear layer (2-D ``weight``, optional
    ``bias``) or a norm (1-D tensors) over the previous layer's output, widths chained. Anything
    else raises :class:`ConfigError` naming the tensors that do not fit.
    """
    names = [n for n, t in state_dict.items() if t.is_floating_point() and t.dim() >= 1]
    hits = [m for m in map(_BERT_QUERY.match, names) if m]
    if hits:
        prefix = hits[0].group("prefix")
        if num_heads is None:
            raise ConfigError("a BERT-like state dict needs num_heads (config.num_attention_heads)")
        classifier = "classifier" if prefix and "classifier.weight" in state_dict else None
        layers = 1 + max(int(m.group("i")) for m in hits if m.group("prefix") == prefix)
        pooler = f"{prefix}pooler.dense.weight" in state_dict
        spec = bert_spec(layers, num_heads, prefix, pooler=pooler, classifier=classifier).restrict(names)
        covered = set(spec.tensor_names()) | ({"classifier.bias"} if classifier else set())
        left = [n for n in names if n not in covered]
        if left:
            shown = ", ".join(left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
            raise ConfigError(f"BERT-like layout, but tensors not covered: {shown}; pass a PermutationSpec")
        return spec
    return _detect_mlp(state_dict, names)


def _detect_mlp(state_dict: StateDict, names: list[str], conv: bool = False) -> PermutationSpec:
    """A chain of linear layers (with ``conv``: also convolutions, ``weight [out, in, *kernel]``)."""
    modules: dict[str, dict[str, Tensor]] = {}
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        modules.setdefault(prefix, {})[leaf] = state_dict[name]
    layers: list[str] = []
    norms: dict[str, int] = {}
    width: int | None = None
    for prefix, leaves in modules.items():
        weight = leaves.get("weight")
        dims_ok = weight is not None and (weight.dim() == 2 or (conv and weight.dim() > 2))
        linear = dims_ok and set(leaves) <= {"weight", "bias"}
        norm = set(leaves) <= set(_NORM_LEAVES) and all(t.dim() == 1 for t in leaves.values())
        if linear and weight is not None and width in (None, weight.shape[1]):
            layers.append(prefix)
            width = weight.shape[0]
        elif norm and (not layers or all(t.shape[0] == width for t in leaves.values())):
            norms.update({prefix: len(layers) - 1} if layers else {})
        else:
            shapes = {leaf: list(t.shape) for leaf, t in leaves.items()}
            raise ConfigError(
                "cannot read the state dict as a BERT-like encoder or a chain of linear layers: module "
                f"{prefix or '<root>'} has {shapes} after width {width}; pass a PermutationSpec"
            )
    if not layers:
        raise ConfigError("cannot detect the model layout: no linear layer found")
    return mlp_spec(layers, norms).restrict(names)


_SUPPORTED = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.LayerNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
)


def spec_for_module(model: nn.Module) -> PermutationSpec:
    """Spec of a model: BERT-like when it has a ``config`` with ``num_attention_heads``, else an MLP/CNN.

    MLP/CNN: ``nn.Linear`` layers, convolutions (``nn.Conv1d/2d/3d``, ``groups=1``; a space is the
    output channels of one and the input channels of the next) and norms (LayerNorm, BatchNorm) in
    registration order, taken to be execution order; other modules must hold no parameters and act
    on each feature or channel alike (activations, dropout, pooling, global averaging): the
    permutation symmetry of the hidden units. Flattening ``C·H·W`` features into a linear layer
    breaks that chain (caught by the width check).
    """
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_attention_heads"):
        return spec_for_state_dict(model.state_dict(), num_heads=int(config.num_attention_heads))
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        groups = getattr(module, "groups", 1)
        if own and (not isinstance(module, _SUPPORTED) or groups != 1):
            kind = type(module).__name__ + (f", groups={groups}" if groups != 1 else "")
            raise ConfigError(f"module {name} ({kind}) is not supported; pass a spec")
    sd = model.state_dict()
    return _detect_mlp(sd, [n for n, t in sd.items() if t.is_floating_point() and t.dim() >= 1], conv=True)


def present_spec(
    spec: PermutationSpec, source: StateDict, target: StateDict, same_shapes: bool = True
) -> PermutationSpec:
    """The spec restricted to the tensors of both state dicts (a tensor in only one is an error).

    With ``same_shapes`` every such tensor must have one shape in both (TransFusion).
    """
    one_sided = [n for n in spec.tensor_names() if (n in source) != (n in target)]
    if one_sided:
        raise MismatchError(f"tensors present in only one of source and target: {', '.join(one_sided[:10])}")
    spec = spec.restrict(n for n in spec.tensor_names() if n in source)
    for name in spec.tensor_names() if same_shapes else []:
        shape_a, shape_b = list(source[name].shape), list(target[name].shape)
        if shape_a != shape_b:
            raise MismatchError(
                f"{name}: shapes differ (source {shape_a}, target {shape_b}); "
                "TransFusion needs one architecture, use Theseus across widths"
            )
    return spec
