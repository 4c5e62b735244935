"""The options of a job as a ``--config`` file: ``gradfix.yaml``, written beside ``gradfix.json``.

:func:`transport_options` and :func:`merge_options` turn the arguments of
:func:`~gradfix.jobs.transport_checkpoints` and :func:`~gradfix.jobs.merge_checkpoints` into the
mapping that ``gradfix transport --config`` (or ``merge``) reads: the keys are the command's option
names, every settings field is written (a ``null`` takes the method's default, as on the command
line), and inputs that exist on this machine are absolute paths, so the file replays from any
folder. What only says where and how to write (``out``, ``overwrite``, ``votes_out``, ``json``) is
left out: the replay's ``--out`` names its own output. The jobs store the mapping in the record
under ``"options"``; :func:`replay_yaml` renders it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from gradfix.io.hub import hub_origin, parse_hub_id
from gradfix.settings import MaskSettings, MergeSettings, VoteSettings

REPLAY_FILE = "gradfix.yaml"

_PATH_SETTINGS = ("data", "validation")
"""Settings fields that name input files."""
_MERGE_MASKING = ("mask", "alpha", "threshold", "include", "exclude", "unvoted", "gamma")
"""The mask settings that ``gradfix merge`` takes (it chooses nothing)."""
_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def input_path(path: str | Path | None) -> str | None:
    """An input as the replay names it: absolute when it exists here, else as given (a Hub id)."""
    if path is None:
        return None
    text = os.fspath(path)
    return os.path.abspath(text) if os.path.exists(text) else text


def shard_size(shard_bytes: int) -> str | int:
    """``--shard-size`` as written by hand when it is a whole number of GiB, MiB or KiB."""
    for unit, size in _UNITS:
        if shard_bytes % size == 0:
            return f"{shard_bytes // size}{unit}"
    return shard_bytes


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists, so that it dumps as plain YAML."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _settings(settings: Any, skip: Sequence[str] = ()) -> dict[str, Any]:
    """A settings dataclass's fields (input files as absolute paths), ``skip`` left out."""
    fields = {key: _plain(value) for key, value in asdict(settings).items() if key not in skip}
    for key in _PATH_SETTINGS:
        if key in fields:
            fields[key] = input_path(fields[key])
    return fields


def transport_options(
    source_base: str | Path,
    source_finetuned: str | Path,
    target_base: str | Path,
    votes: VoteSettings,
    masking: MaskSettings,
    method: str,
    shard_bytes: int,
    votes_in: Sequence[str | Path] = (),
    **extra: Any,
) -> dict[str, Any]:
    """The ``gradfix transport --config`` mapping that replays a transport.

    ``masking`` is as given (before the method fills in its defaults), ``method`` the resolved
    method's name; ``extra`` adds options of the command that are not settings fields.
    """
    return {
        "source_base": input_path(source_base),
        "source_finetuned": input_path(source_finetuned),
        "target_base": input_path(target_base),
        "votes_in": [input_path(p) for p in votes_in],
        "method": method,
        **_settings(votes),
        **_settings(masking),
        "shard_size": shard_size(shard_bytes),
        **extra,
    }


def merge_options(
    tasks: Sequence[Any],
    target_base: str | Path,
    merging: MergeSettings,
    votes: VoteSettings,
    masking: MaskSettings,
    shard_bytes: int,
    **extra: Any,
) -> dict[str, Any]:
    """The ``gradfix merge --config`` mapping that replays a merge.

    ``tasks`` are :class:`~gradfix.jobs.TaskSpec` (written as ``tasks:``), ``masking`` the
    resolved mask settings (a merge's mask, α and threshold are never left to a method).
    """
    mask = _settings(masking)
    return {
        "tasks": [
            {
                "source_base": input_path(t.source_base),
                "source_finetuned": input_path(t.source_finetuned),
                "data": input_path(t.data),
            }
            for t in tasks
        ],
        "target_base": input_path(target_base),
        **_settings(merging),
        **_settings(votes, skip=("data", "signs")),
        **{key: mask[key] for key in _MERGE_MASKING},
        "shard_size": shard_size(shard_bytes),
        **extra,
    }


def replay_yaml(command: str, options: Mapping[str, Any]) -> str:
    """``gradfix.yaml``: a comment saying how to replay it, then ``options`` in their order."""
    body = yaml.safe_dump(dict(options), sort_keys=False, allow_unicode=True, default_flow_style=False)
    return (
        f"# The options of this gradfix {command}. The same inputs give the same weights with:\n"
        f"#   gradfix {command} --config {REPLAY_FILE} --out OTHER_FOLDER/\n"
        "# (options given on the command line override these.)\n"
        f"{body}"
    )


__all__ = [
    "REPLAY_FILE",
    "input_path",
    "merge_options",
    "replay_yaml",
    "shard_size",
    "transport_options",
]


def pin_hub_inputs(options: dict[str, Any], resolved: Mapping[str, str | Path]) -> None:
    """Name each input given as a Hub id by the commit it resolved to (``org/name@<commit>``), so
    that a replay reads the same snapshot even after the branch or tag it named has moved."""
    for key, folder in resolved.items():
        origin = hub_origin(folder)
        if origin is not None and parse_hub_id(str(options.get(key))) is not None:
            options[key] = f"{origin.repo_id}@{origin.commit}"
