"""TransFusion: data-free re-basin of a task vector onto a permuted target by weight matching.

Hidden units of an MLP, the FFN units, attention heads, the dimensions within a head and the
residual stream of a transformer can be permuted without changing the function. A
:class:`PermutationSpec` says which tensor axes share a permutation (a *group*); weight matching
finds, for every group, the permutation ``P_g`` of the source's units that best lines the source
weights up with the target's, and the source task vector is permuted the same way:

```
P_g = argmax_P  Σ_{(W, axis) ∈ g} ⟨P(W_A), W_B⟩        (other groups' permutations held fixed)
τ_B = P(τ_A)
```

A permutation is stored as a ``LongTensor p``: source unit ``p[j]`` goes to target position ``j``
(``W' = W.index_select(axis, p)``). The same spec describes the spaces of Theseus
(:mod:`gradfix.methods.theseus`), where a group is a space and ``P`` becomes an orthogonal map.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from gradfix.errors import ConfigError, MismatchError
from gradfix.task_vector import TaskVector

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


# -- weight matching ----------------------------------------------------------------------------
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


def _similarity(a: StateDict, b: StateDict, spec: PermutationSpec, perms: StateDict, group: str) -> Tensor:
    """``S[j, k] = Σ_{(W, axis) ∈ group} ⟨W_B[j], P_{−group}(W_A)[k]⟩`` (slices along ``axis``)."""
    n = len(perms[group])
    sim = torch.zeros(n, n, dtype=torch.float64)
    for tensor, axis in spec.groups[group]:
        w_a = a[tensor]
        for other, g in spec.axes_of(tensor).items():
            if other != axis:
                w_a = w_a.index_select(other, perms[g])
        sim += b[tensor].movedim(axis, 0).reshape(n, -1) @ w_a.movedim(axis, 0).reshape(n, -1).T
    return sim


def head_spectra(tensor: Tensor, axis: int, num_heads: int) -> Tensor:
    """Singular values of each head's slice: ``s(W^h)`` for ``W^h = W[h·d:(h+1)·d]`` along ``axis``.

    Spectra do not change under permutations within a head or of the other axes, so heads can be
    matched before anything else is known. Returns ``[num_heads, min(d, rest)]``.
    """
    n = tensor.shape[axis]
    blocks = tensor.double().movedim(axis, 0).reshape(num_heads, n // num_heads, -1)
    return torch.linalg.svdvals(blocks)


def match_heads(a: StateDict, b: StateDict, spec: PermutationSpec, head_set: HeadSet) -> Tensor:
    """Head permutation ``σ`` minimising ``Σ_j Σ_W ‖s(W_B^j) − s(W_A^{σ(j)})‖₂`` (Hungarian).

    The sum runs over every (tensor, axis) of the head set's groups; ``σ[j]`` is the source head
    placed at target head ``j``.
    """
    h = head_set.num_heads
    cost = torch.zeros(h, h, dtype=torch.float64)
    for group in head_set.groups:
        for tensor, axis in spec.groups[group]:
            cost += torch.cdist(head_spectra(b[tensor], axis, h), head_spectra(a[tensor], axis, h))
    _, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(cols, dtype=torch.long)


def _assign(sim: Tensor, heads: tuple[Tensor, int] | None) -> Tensor:
    """Hungarian ``argmax_p Σ_j S[j, p[j]]``; within the matched head blocks when ``heads`` is given."""
    if heads is None:
        return torch.as_tensor(linear_sum_assignment(sim.numpy(), maximize=True)[1], dtype=torch.long)
    sigma, d = heads
    perm = torch.empty(sim.shape[0], dtype=torch.long)
    for j, src in enumerate(sigma.tolist()):
        _, cols = linear_sum_assignment(
            sim[j * d : (j + 1) * d, src * d : (src + 1) * d].numpy(), maximize=True
        )
        perm[j * d : (j + 1) * d] = src * d + torch.as_tensor(cols)
    return perm


def match_permutations(
    source: StateDict, target: StateDict, spec: PermutationSpec, *, max_iter: int = 100, seed: int = 0
) -> dict[str, Tensor]:
    """Weight matching: ``P = argmax_P Σ_g Σ_{(W, axis) ∈ g} ⟨P(W_A), W_B⟩`` by coordinate descent.

    Attention heads are matched first by their singular-value spectra (:func:`match_heads`) and
    stay fixed. Then, for up to ``max_iter`` rounds, every group in a seeded random order gets the
    Hungarian assignment of its similarity ``S`` (other groups held fixed; head-split groups are
    assigned within each matched head); the loop stops after a round with no improvement.
    Returns ``{group: p}`` with ``p[j]`` the source unit placed at target position ``j``.
    """
    spec = present_spec(spec, source, target)
    sizes = spec.sizes(source)
    a = {n: source[n].detach().double() for n in spec.tensor_names()}
    b = {n: target[n].detach().double() for n in spec.tensor_names()}
    perms = {g: torch.arange(n) for g, n in sizes.items()}
    heads: dict[str, tuple[Tensor, int]] = {}
    for head_set in spec.head_sets.values():
        sigma = match_heads(a, b, spec, head_set)
        for g in head_set.groups:
            d = sizes[g] // head_set.num_heads
            heads[g] = (sigma, d)
            perms[g] = (sigma[:, None] * d + torch.arange(d)).reshape(-1)
    groups = list(sizes)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        progress = False
        for index in torch.randperm(len(groups), generator=generator).tolist():
            group = groups[index]
            sim = _similarity(a, b, spec, perms, group)
            new = _assign(sim, heads.get(group))
            rows = torch.arange(len(new))
            old_score, new_score = float(sim[rows, perms[group]].sum()), float(sim[rows, new].sum())
            if new_score > old_score + 1e-12 * max(1.0, abs(old_score)):
                perms[group], progress = new, True
        if not progress:
            break
    return perms


def apply_permutations(tensors: StateDict, perms: StateDict, spec: PermutationSpec) -> dict[str, Tensor]:
    """``P(W)``: every axis in a permuted group re-indexed, ``W' = W.index_select(axis, p_g)``.

    Works on state dicts and task vectors alike; tensors outside the spec pass through unchanged.
    """
    out = {}
    for name, t in tensors.items():
        for axis, group in spec.axes_of(name).items():
            if group not in perms:
                continue
            if t.shape[axis] != len(perms[group]):
                units = f"{t.shape[axis]} units but group {group!r} permutes {len(perms[group])}"
                raise MismatchError(f"{name}: axis {axis} has {units}")
            t = t.index_select(axis, perms[group].to(t.device))
        out[name] = t
    return out


def alignment(source: StateDict, target: StateDict, spec: PermutationSpec, perms: StateDict) -> float:
    """Cosine ``⟨P(θ_A), θ_B⟩ / (‖θ_A‖ ‖θ_B‖)`` over the spec's tensors: how well the bases line up."""
    permuted = apply_permutations(
        {n: source[n].double() for n in spec.tensor_names() if n in source}, perms, spec
    )
    dot = sum(float((permuted[n] * target[n].double()).sum()) for n in permuted)
    norm_a = sum(float(t.pow(2).sum()) for t in permuted.values()) ** 0.5
    norm_b = sum(float(target[n].double().pow(2).sum()) for n in permuted) ** 0.5
    return dot / (norm_a * norm_b) if norm_a and norm_b else 0.0


def transfusion_task_vector(
    tau_a: StateDict,
    source_base: StateDict,
    target_base: StateDict,
    spec: PermutationSpec | None = None,
    *,
    num_heads: int | None = None,
    max_iter: int = 100,
    seed: int = 0,
) -> TaskVector:
    """TransFusion: ``τ_B = P(τ_A)`` with ``P`` from weight matching ``θ_A`` onto ``θ_B`` (data-free).

    ``spec`` defaults to :func:`spec_for_state_dict` of the source base (``num_heads`` for
    BERT-like models). The result lives in the target's coordinates: add it with
    ``TaskVector.apply_to`` or mask it first (e.g. GradFix's agreement mask).
    """
    if spec is None:
        spec = spec_for_state_dict(source_base, num_heads=num_heads)
    perms = match_permutations(source_base, target_base, spec, max_iter=max_iter, seed=seed)
    return TaskVector(apply_permutations(tau_a, perms, spec))
