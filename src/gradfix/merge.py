"""Merging several task vectors, alone or combined with GradFix masks (method.md, Sec. 5.2).

- :func:`merge_task_vectors`: Task Arithmetic ``τ = Σ_t w_t τ^t`` or TIES-Merging, tensor by
  tensor; the merged vector is applied as ``θ = θ_B + α τ``.
- :func:`mask_then_merge`: transport each ``τ^t`` with its own reference, then merge.
- :func:`multi_source_merge`: several source bases, one task, one target reference ``ŝ``:
  mask-then-merge with that reference repeated.
- :func:`merge_then_mask`: merge first, then mask with the consensus sign
  ``ŝ_i = sign(Σ_t ŝ_i^t)`` of the per-task references (best for multi-task in the paper).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from gradfix.checks import check_same_architecture
from gradfix.errors import ConfigError, MismatchError
from gradfix.masking import ReferenceLike, mask_task_vector, reference_signs
from gradfix.ops.masks import MASKS, get_mask
from gradfix.ops.merging import (
    ELECT_METHODS,
    check_density,
    magnitude_threshold,
    task_arithmetic,
    ties_merge,
)
from gradfix.ops.signs import consensus_sign
from gradfix.task_vector import TaskVector
from gradfix.votes import SignVotes

MERGE_METHODS: dict[str, str] = {
    "task_arithmetic": "weighted sum Σ_t w_t τ^t (Task Arithmetic)",
    "ties": "trim to the top-density magnitudes, elect a sign, disjoint mean (TIES-Merging)",
}
"""Merge methods accepted by :func:`merge_task_vectors`, with a one-line description."""

TRIM_SCOPES: dict[str, str] = {
    "tensor": "each tensor trimmed to its own top-density magnitudes (PEFT, mergekit)",
    "model": "one threshold per task vector over all its tensors (original TIES code)",
}
"""Where TIES trimming ranks magnitudes, with a one-line description."""

MERGE_OPTIONS = ("density", "elect", "trim_scope", "weights")
"""Keyword options of :func:`merge_task_vectors` that the mask/merge pipelines pass through."""


def merge_task_vectors(
    task_vectors: Sequence[Mapping[str, Tensor]],
    method: str = "ties",
    *,
    density: float = 0.2,
    elect: str = "mass",
    trim_scope: str = "tensor",
    weights: Sequence[float] | None = None,
) -> TaskVector:
    """Merge task vectors tensor by tensor into one task vector ``τ``.

    - ``task_arithmetic``: ``τ = Σ_t w_t τ^t``;
    - ``ties`` (default): ``τ̂^t = w_t · trim(τ^t)``, ``γ_i = elect(τ̂_i)``,
      ``τ_i = mean{τ̂_i^t : sign(τ̂_i^t) = γ_i ≠ 0}`` (0 where no task agrees).

    Defaults: ``density = 0.2`` (the TIES paper's kept fraction); ``elect = "mass"``
    (``sign(Σ_t τ̂^t)``, the TIES paper; ``"count"`` is ``sign(Σ_t sign(τ̂^t))``, the GradFix
    reference code); ``trim_scope = "tensor"`` (each tensor keeps its own top-density magnitudes,
    as PEFT and mergekit do, with memory bounded by one tensor; ``"model"`` ranks all tensors of a
    task vector together, as the original TIES code does, and holds one copy of its magnitudes);
    ``weights = None`` (every ``w_t = 1``). ``density``, ``elect`` and ``trim_scope`` only affect
    ``ties``. The scale ``α`` is applied later, with ``τ.apply_to(θ_B, α)``.

    Every task vector must have the same names and shapes (one :class:`MismatchError` lists every
    difference); the result keeps the names in the first task vector's order. Unknown methods or
    options raise :class:`ConfigError`.
    """
    _check_merge_options(method, density, elect, trim_scope, weights, len(task_vectors))
    names = _check_task_vectors(task_vectors)
    w = None if weights is None else [float(x) for x in weights]
    out: dict[str, Tensor] = {}
    if method == "task_arithmetic":
        for name in names:
            out[name] = task_arithmetic([tv[name] for tv in task_vectors], w)
        return TaskVector(out)
    thresholds = None
    if trim_scope == "model" and density < 1.0:
        thresholds = [magnitude_threshold([tv[n] for n in names], density) for tv in task_vectors]
    for name in names:
        taus = [tv[name] for tv in task_vectors]
        out[name] = ties_merge(taus, density, elect, thresholds, weights=w)
    return TaskVector(out)


def mask_then_merge(
    task_vectors: Sequence[Mapping[str, Tensor]],
    references: Sequence[ReferenceLike],
    *,
    mask: str = "agreement",
    method: str = "ties",
    mask_options: Mapping[str, Any] | None = None,
    **merge_options: Any,
) -> TaskVector:
    """Transport each task vector with its own reference, then merge: ``merge_t(m^t ⊙ τ^t)``.

    ``m^t`` is the ``mask`` of :func:`gradfix.masking.mask_task_vector` against
    ``references[t]`` (the target's sign votes ``ŝ^t`` for task t, an oracle task vector, or a
    ``{name: sign}`` mapping). ``mask_options`` (``gamma``, ``seed``, ``unvoted``) go to the mask;
    task t uses ``seed + t``, so random-sign ablations differ across tasks. ``merge_options``
    (``density``, ``elect``, ``trim_scope``, ``weights``) go to :func:`merge_task_vectors`.
    Masking each task first can discard coordinates that other tasks would have kept.
    """
    options = _check_pipeline(task_vectors, references, mask, method, mask_options, merge_options)
    _check_task_vectors(task_vectors)
    seed = int(options.pop("seed", 0))
    masked = [
        mask_task_vector(tv, ref, mask, seed=seed + t, **options)
        for t, (tv, ref) in enumerate(zip(task_vectors, references, strict=True))
    ]
    return merge_task_vectors(masked, method, **merge_options)


def multi_source_merge(
    task_vectors: Sequence[Mapping[str, Tensor]],
    reference: ReferenceLike,
    *,
    mask: str = "agreement",
    method: str = "ties",
    mask_options: Mapping[str, Any] | None = None,
    **merge_options: Any,
) -> TaskVector:
    """Multi-source transport: one task from several source bases onto one target.

    ``τ = merge_s(m ⊙ τ_{A_s})`` with every ``m`` from the same target reference ``ŝ`` —
    :func:`mask_then_merge` with ``reference`` repeated for each source task vector.
    """
    references = [reference] * len(task_vectors)
    return mask_then_merge(
        task_vectors,
        references,
        mask=mask,
        method=method,
        mask_options=mask_options,
        **merge_options,
    )


def merge_then_mask(
    task_vectors: Sequence[Mapping[str, Tensor]],
    references: Sequence[ReferenceLike],
    *,
    mask: str = "agreement",
    method: str = "ties",
    mask_options: Mapping[str, Any] | None = None,
    **merge_options: Any,
) -> TaskVector:
    """Merge first, then mask with the consensus sign: ``τ = m ⊙ merge_t(τ^t)``.

    ``m_i = 1[sign(τ_i) = ŝ_i]`` (for ``mask = "agreement"``) with the consensus
    ``ŝ_i = sign(Σ_t ŝ_i^t)`` of the per-task reference signs (the most frequent sign, 0 on a
    tie). A tensor that no reference covers (absent, or never voted on) is left out of the
    consensus and handled by ``mask_options["unvoted"]`` as in
    :func:`gradfix.masking.mask_task_vector`. Masks: ``agreement``, ``forcing``, ``random`` and
    ``none``; ``magnitude`` needs a real-valued reference that a consensus sign does not give.
    ``merge_options`` go to :func:`merge_task_vectors`.
    """
    options = _check_pipeline(task_vectors, references, mask, method, mask_options, merge_options)
    if get_mask(mask).reads == "value":
        usable = ", ".join(name for name, m in MASKS.items() if m.reads != "value")
        raise ConfigError(
            f"merge_then_mask masks with a consensus sign; the {mask!r} mask needs a "
            f"real-valued reference: choose one of {usable}"
        )
    merged = merge_task_vectors(task_vectors, method, **merge_options)
    if not get_mask(mask).needs_reference:
        return merged
    consensus = consensus_signs(references, merged.shapes())
    return mask_task_vector(merged, consensus, mask, **options)


def consensus_signs(
    references: Sequence[ReferenceLike], shapes: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, Tensor]:
    """Consensus reference ``ŝ_i = sign(Σ_t ŝ_i^t)`` per tensor, as int8 in {−1, 0, 1}.

    A reference that lacks a tensor (or, for sign votes, never voted on it) casts no vote there;
    a tensor that no reference covers is left out. With ``shapes`` given, only those names are
    built and every covering reference must match the given shape (one :class:`MismatchError`
    lists every difference).
    """
    per_ref: list[dict[str, Tensor]] = []
    for ref in references:
        signs = reference_signs(ref)
        if isinstance(ref, SignVotes):
            for name in ref.untouched():
                signs.pop(name, None)
        per_ref.append(signs)
    names: list[str] = []
    for signs in per_ref:
        names.extend(n for n in signs if n not in names and (shapes is None or n in shapes))
    problems = []
    for name in names:
        want = tuple(shapes[name]) if shapes is not None else None
        for t, signs in enumerate(per_ref):
            if name not in signs:
                continue
            got = tuple(signs[name].shape)
            want = got if want is None else want
            if got != want:
                problems.append(f"{name}: reference {t} has shape {list(got)}, expected {list(want)}")
    if problems:
        raise MismatchError(
            f"{len(problems)} reference tensor(s) differ in shape:\n  " + "\n  ".join(problems)
        )
    return {name: consensus_sign([s[name] for s in per_ref if name in s]) for name in names}


def _check_task_vectors(task_vectors: Sequence[Mapping[str, Tensor]]) -> list[str]:
    if len(task_vectors) == 0:
        raise ConfigError("need at least one task vector to merge")
    check_same_architecture(
        {f"task vector {i}": {n: tuple(t.shape) for n, t in tv.items()} for i, tv in enumerate(task_vectors)}
    )
    return list(task_vectors[0])


def _check_merge_options(
    method: str,
    density: float,
    elect: str,
    trim_scope: str,
    weights: Sequence[float] | None,
    num_tasks: int,
) -> None:
    if method not in MERGE_METHODS:
        raise ConfigError(f"unknown merge method {method!r}; choose one of {', '.join(MERGE_METHODS)}")
    if elect not in ELECT_METHODS:
        raise ConfigError(f"unknown sign election {elect!r}; choose one of {', '.join(ELECT_METHODS)}")
    if trim_scope not in TRIM_SCOPES:
        raise ConfigError(f"unknown trim scope {trim_scope!r}; choose one of {', '.join(TRIM_SCOPES)}")
    try:
        check_density(density)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if weights is not None:
        try:
            values = [float(x) for x in weights]
        except (TypeError, ValueError):
            raise ConfigError(f"weights must be numbers, got {weights!r}") from None
        if len(values) != num_tasks:
            raise ConfigError(f"got {len(values)} weights for {num_tasks} task vectors")
        if any(v != v or v in (float("inf"), float("-inf")) for v in values):
            raise ConfigError(f"weights must be finite, got {values}")


def _check_pipeline(
    task_vectors: Sequence[Mapping[str, Tensor]],
    references: Sequence[ReferenceLike],
    mask: str,
    method: str,
    mask_options: Mapping[str, Any] | None,
    merge_options: Mapping[str, Any],
) -> dict[str, Any]:
    """Validate a mask/merge pipeline's arguments before any work; return the mask options."""
    if len(references) != len(task_vectors):
        raise ConfigError(
            f"got {len(references)} reference(s) for {len(task_vectors)} task vector(s); "
            "give one reference per task vector"
        )
    get_mask(mask)  # a ConfigError listing the masks for an unknown one
    unknown = sorted(set(merge_options) - set(MERGE_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown merge option(s) {', '.join(unknown)}; valid: {', '.join(MERGE_OPTIONS)}")
    options = dict(mask_options or {})
    valid_mask_options = ("gamma", "seed", "unvoted", "threshold")
    bad = sorted(set(options) - set(valid_mask_options))
    if bad:
        raise ConfigError(f"unknown mask option(s) {', '.join(bad)}; valid: {', '.join(valid_mask_options)}")
    _check_merge_options(
        method,
        merge_options.get("density", 0.2),
        merge_options.get("elect", "mass"),
        merge_options.get("trim_scope", "tensor"),
        merge_options.get("weights"),
        len(task_vectors),
    )
    return options
