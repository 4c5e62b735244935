"""An aligned transport from activations: A and B loaded with the recipe, run on the same shots.

``gradfix transport --method theseus --data FILE`` maps ``τ_A`` from what A and B compute on the
shots, drawn as the votes draw them (``--shots`` per class with ``--seed``; from data without
classes, ``--shots`` examples in all). Each base is loaded through the recipe family
(``--recipe``, with ``--template`` and ``--max-length``) and tokenises the shots itself; both must
give the same tokens, so that the activations pair up token by token. ``τ_A`` is renamed from A's
checkpoint names to the loaded model's parameter names, mapped
(:meth:`gradfix.methods.aligned.AlignedMethod.from_activations`), and renamed to B's checkpoint
names; every mapped tensor must then have B's shape.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from gradfix.data import batched
from gradfix.errors import ConfigError, MismatchError
from gradfix.io import open_checkpoint
from gradfix.jobs.common import Shots, load_target
from gradfix.jobs.inputs import data_record
from gradfix.methods.aligned import AlignedMethod
from gradfix.recipes.base import place_batch
from gradfix.settings import VoteSettings
from gradfix.task_vector import TaskVector


def model_family(folder: str | Path) -> str | None:
    """``model_type`` from a model folder's ``config.json`` (``None`` when it has none)."""
    try:
        value = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return str(value) if value else None


def check_same_family(method: str, source_base: str | Path, target_base: str | Path) -> None:
    """A :class:`ConfigError` when the two bases' ``config.json`` name different model types."""
    a, b = model_family(source_base), model_family(target_base)
    if a is not None and b is not None and a != b:
        raise ConfigError(
            f"source base {source_base} is a {a!r} model but target base {target_base} is a {b!r} model; "
            f"--method {method} maps between models of one architecture family"
        )


def align_on_shots(
    method: AlignedMethod,
    tau_a: TaskVector,
    bases: tuple[str | Path, str | Path],
    votes: VoteSettings,
    drawn: Shots,
) -> tuple[TaskVector, dict[str, Any]]:
    """``τ_A`` in B's coordinates and checkpoint names, mapped from A's and B's activations on the
    drawn shots, and the record of the mapping (``gradfix.json``'s ``"theseus"``)."""
    source_base, target_base = bases
    with open_checkpoint(source_base) as ra, open_checkpoint(target_base) as rb:
        names_a, names_b, shapes_b = ra.names(), rb.names(), rb.shapes()
    model_a, recipe_a, to_ckpt_a = _load("source base", source_base, votes, drawn, names_a)
    model_b, recipe_b, to_ckpt_b = _load("target base", target_base, votes, drawn, names_b)
    if type(model_a) is not type(model_b):
        raise ConfigError(
            f"the recipe loads source base {source_base} as {type(model_a).__name__} but target base "
            f"{target_base} as {type(model_b).__name__}; --method {method.name} maps between models of "
            "one architecture family"
        )
    batches, tokens = _paired_batches(drawn, votes.batch_size, (model_a, recipe_a), (model_b, recipe_b))
    from_ckpt_a = {c: m for m, c in to_ckpt_a.items()}
    in_model = {from_ckpt_a[n]: t for n, t in tau_a.items() if n in from_ckpt_a}
    forwards = (
        lambda model, pair: recipe_a.loss(model, pair[0]),
        lambda model, pair: recipe_b.loss(model, pair[1]),
    )
    mapped, record = method.from_activations(
        in_model, (model_a, model_b), batches, forwards, lambda pair: pair[0].get("attention_mask")
    )
    tau = {n: t for n, t in tau_a.items() if n not in from_ckpt_a}  # outside the model: as they are
    for name, tensor in mapped.items():
        if name not in to_ckpt_b:
            raise MismatchError(f"{name}: a parameter of the source base's model but not of the target's")
        tau[to_ckpt_b[name]] = tensor
    _check_shapes(tau, shapes_b, target_base)
    record.update(
        examples=len(drawn.drawn), tokens=tokens, data=data_record(drawn.data),
        drawn_lines=[ex.line for ex in drawn.drawn],
    )  # fmt: skip
    return TaskVector(tau), record


def _load(
    label: str, folder: str | Path, votes: VoteSettings, drawn: Shots, names: Sequence[str]
) -> tuple[nn.Module, Any, dict[str, str]]:
    """A base loaded with the recipe, frozen; a load error names the base."""
    try:
        return load_target(folder, votes, drawn.labels, names, [])
    except ConfigError as exc:
        raise ConfigError(f"{label} {folder}: {exc}") from None


Batch = Mapping[str, Tensor]


def _same_tokens(batch_a: Batch, batch_b: Batch) -> bool:
    """Whether two tokenisations have the same token ids' shape and the same attention mask."""
    mask_a, mask_b = batch_a.get("attention_mask"), batch_b.get("attention_mask")
    ids_a, ids_b = batch_a.get("input_ids"), batch_b.get("input_ids")
    if ids_a is not None and ids_b is not None and ids_a.shape != ids_b.shape:
        return False
    if mask_a is None or mask_b is None:
        return mask_a is None and mask_b is None
    return mask_a.shape == mask_b.shape and bool((mask_a.cpu() == mask_b.cpu()).all())


def _paired_batches(
    drawn: Shots, batch_size: int, a: tuple[nn.Module, Any], b: tuple[nn.Module, Any]
) -> tuple[list[tuple[Batch, Batch]], int]:
    """Each chunk of shots as ``(A's batch, B's batch)``, and the number of tokens in all.

    A :class:`ConfigError` when the two tokenisations differ (other lengths or padding)."""
    pairs: list[tuple[Batch, Batch]] = []
    tokens = 0
    for chunk in batched(drawn.drawn, batch_size):
        batch_a, batch_b = (place_batch(recipe.collate(chunk), model) for model, recipe in (a, b))
        if not _same_tokens(batch_a, batch_b):
            raise ConfigError(
                f"{drawn.data}: source and target base tokenise the examples of lines "
                f"{chunk[0].line}-{chunk[-1].line} differently; Theseus pairs their activations token by "
                "token, so both need the same tokenizer"
            )
        mask, ids = batch_a.get("attention_mask"), batch_a.get("input_ids")
        tokens += int(mask.sum()) if mask is not None else (ids.numel() if ids is not None else 0)
        pairs.append((batch_a, batch_b))
    return pairs, tokens


def _check_shapes(tau: Mapping[str, Tensor], shapes: Mapping[str, Sequence[int]], target: str | Path) -> None:
    """Every tensor of the mapped ``τ`` must be one of the target's, of its shape."""
    for name, tensor in tau.items():
        if name not in shapes:
            raise MismatchError(f"{name}: in τ_A but not in target base {target}; exclude it (--exclude)")
        if list(tensor.shape) != list(shapes[name]):
            raise MismatchError(
                f"{name}: shape {list(tensor.shape)} after the mapping but {list(shapes[name])} in target "
                f"base {target}; Theseus maps the parameters of the model the recipe loads, exclude the "
                "others (--exclude)"
            )
