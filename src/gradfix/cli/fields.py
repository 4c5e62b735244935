"""The options of ``transport``, ``merge``, ``eval`` and ``check``: each one's kind and default.

The settings fields and their defaults come from :mod:`gradfix.settings`, the names of methods,
masks and recipes from their registries; only the inputs and outputs of each command are listed
here. :func:`command_options` is what the flags (:mod:`gradfix.cli.options`) and the validation
of the command line and ``--config`` (:mod:`gradfix.cli.config`) both read.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, fields
from functools import cache
from typing import Any

from gradfix.cli.schema import (
    ALPHA,
    ALPHA_GRID,
    BOOL,
    DENSITY,
    DEVICE,
    FLOAT,
    NON_NEGATIVE,
    POSITIVE_INT,
    SHOTS,
    SIZE,
    STR,
    STR_LIST,
    TASKS,
    THRESHOLD_GRID,
    Kind,
    choice,
    cli_kind,
    optional,
)
from gradfix.settings import (
    DEFAULT_ALPHA,
    DEFAULT_MERGE_MASK,
    DEFAULT_THRESHOLD,
    CheckSettings,
    EvalSettings,
    HubSettings,
    MaskSettings,
    MergeSettings,
    OutputSettings,
    VoteSettings,
)

COMMANDS = ("transport", "merge", "eval", "check")
MERGE_UNSUPPORTED_MASKS = ("tensorwise",)
"""Masks that need the mean gradient per tensor, which the merge pipelines do not keep."""


@dataclass(frozen=True)
class Option:
    """One option of a command: its kind and its default (``None``: the command decides)."""

    kind: Kind
    default: Any = None


def _registry_names() -> dict[str, tuple[str, ...]]:
    from gradfix.merge import MERGE_METHODS
    from gradfix.methods import METHODS
    from gradfix.ops.masks import MASKS
    from gradfix.recipes import RECIPES

    return {
        "methods": tuple(METHODS),
        "masks": tuple(MASKS),
        "merge_methods": tuple(MERGE_METHODS),
        "recipes": tuple(RECIPES),
    }


def _from_settings(cls: type, kinds: dict[str, Kind], skip: tuple[str, ...] = ()) -> dict[str, Option]:
    """An option per field of the settings dataclass ``cls``, its kind from the field's type."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    return {
        f.name: Option(kinds.get(f.name) or cli_kind(hints[f.name]), getattr(defaults, f.name))
        for f in fields(cls)
        if f.name not in skip
    }


def _paths(*names: str) -> dict[str, Option]:
    return {name: Option(optional(STR)) for name in names}


def _hub() -> dict[str, Option]:
    return _from_settings(HubSettings, {})


def _voting(names: dict[str, tuple[str, ...]], skip: tuple[str, ...] = ()) -> dict[str, Option]:
    kinds = {
        "recipe": choice(names["recipes"]),
        "shots": SHOTS,
        "batch_size": POSITIVE_INT,
        "max_length": optional(POSITIVE_INT),
        "device": DEVICE,
    }
    return _from_settings(VoteSettings, kinds, skip)


def _output() -> dict[str, Option]:
    kinds = {"shard_size": SIZE, "adapter_rank": optional(POSITIVE_INT)}
    return {**_from_settings(OutputSettings, kinds), "json": Option(BOOL, False)}


def _transport(names: dict[str, tuple[str, ...]]) -> dict[str, Option]:
    masking = {
        "mask": optional(choice(names["masks"])),
        "alpha": optional(ALPHA),
        "threshold": optional(NON_NEGATIVE),
        "gamma": FLOAT,
        "thresholds": optional(THRESHOLD_GRID),
        "alphas": optional(ALPHA_GRID),
    }
    return {
        **_paths("source_base", "source_finetuned", "target_base"),
        **_hub(),
        "votes_in": Option(STR_LIST, []),
        "votes_out": Option(optional(STR)),
        "method": Option(optional(choice(names["methods"]))),
        **_voting(names),
        **_from_settings(MaskSettings, masking),
        **_output(),
    }


def _merge(names: dict[str, tuple[str, ...]]) -> dict[str, Option]:
    masks = [m for m in names["masks"] if m not in MERGE_UNSUPPORTED_MASKS]
    masking = _from_settings(
        MaskSettings,
        {"gamma": FLOAT},
        skip=("mask", "alpha", "threshold", "thresholds", "alphas", "validation"),
    )
    return {
        "source_base": Option(STR_LIST, []),
        "source_finetuned": Option(STR_LIST, []),
        **_paths("target_base"),
        **_hub(),
        "data": Option(STR_LIST, []),
        "tasks": Option(optional(TASKS)),
        **_from_settings(MergeSettings, {"method": choice(names["merge_methods"]), "density": DENSITY}),
        **_voting(names, skip=("data", "signs")),
        "mask": Option(choice(masks), DEFAULT_MERGE_MASK),
        "alpha": Option(FLOAT, DEFAULT_ALPHA),
        "threshold": Option(NON_NEGATIVE, DEFAULT_THRESHOLD),
        **masking,
        **_output(),
    }


CHECK_FROM_TRANSPORT = (
    "source_base",
    "source_finetuned",
    "target_base",
    *(f.name for f in fields(VoteSettings)),
    "include",
    "exclude",
)
"""The options ``check`` shares with ``transport``: the very same options (kinds and defaults)."""


def _check(names: dict[str, tuple[str, ...]]) -> dict[str, Option]:
    transport = _transport(names)
    counts = {"bootstrap": POSITIVE_INT, "permutations": POSITIVE_INT, "coordinates": POSITIVE_INT}
    return {
        **{key: transport[key] for key in CHECK_FROM_TRANSPORT},
        **_from_settings(CheckSettings, counts),
        "json": Option(BOOL, False),
    }


def _eval(names: dict[str, tuple[str, ...]]) -> dict[str, Option]:
    kinds = {
        "recipe": choice(names["recipes"]),
        "batch_size": POSITIVE_INT,
        "max_length": optional(POSITIVE_INT),
    }
    return {
        **_paths("model", "data"),
        **_hub(),
        **_from_settings(EvalSettings, kinds),
        "json": Option(BOOL, False),
    }


def registry_key() -> tuple[tuple[str, ...], ...]:
    """The registered names the options depend on (a new registration gives a new key)."""
    return tuple(_registry_names().values())


def command_options(command: str) -> dict[str, Option]:
    """Every option of ``command`` (``transport``, ``merge``, ``eval``, ``check``), by key (``batch_size``).

    Built from the registries as they are now, so a method, mask or recipe registered later is a
    choice too (cached per set of registered names).
    """
    return _command_options(command, registry_key())


@cache
def _command_options(command: str, key: tuple[tuple[str, ...], ...]) -> dict[str, Option]:
    builders = {"transport": _transport, "merge": _merge, "eval": _eval, "check": _check}
    return builders[command](_registry_names())


YAML_ONLY = {"tasks"}
"""Options with no flag: given in ``--config`` only."""
