"""One validated configuration: the command line over ``--config`` YAML over the defaults.

argparse only collects the command line's strings; :func:`validate_options` merges them over the
YAML values and validates the result once with pydantic, so both sources accept and refuse the
same values with the same one-line errors. An output's ``gradfix.yaml`` is such a file, and its
``gradfix.json`` stands for the options it records (the same ones). :func:`validated_options`
runs that step for a given command line and YAML mapping.
"""

from __future__ import annotations

import argparse
import copy
import re
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from gradfix.errors import ConfigError

_NOT_OPTIONS = {"command", "config", "handler", "verbose"}
_FLAGS = {"progress": "--no-progress"}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


def parse_size(text: str | int) -> int:
    """Bytes from ``"2GB"``, ``"500MiB"``, ``"1e6"``-free integers or an int."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"cannot read size {text!r}: use e.g. 2GB, 500MB or a number of bytes")
    unit = (match.group(2) or "").lower().removesuffix("b")
    return int(float(match.group(1)) * _UNITS[unit])


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of option names (dashes or underscores) to values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: a config must be a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options the command line gave (argparse leaves the others ``None``), unconverted."""
    return {k: v for k, v in vars(args).items() if k not in _NOT_OPTIONS and v is not None}


def validate_options(
    command: str,
    cli: Mapping[str, Any],
    config: Mapping[str, Any],
    config_path: str = "config",
) -> dict[str, Any]:
    """Every option of ``command``: ``cli`` over ``config`` over the defaults, validated once.

    ``cli`` holds the command line's strings, ``config`` the values read from YAML (keys with
    dashes or underscores). Both go through the same pydantic types (:mod:`gradfix.cli.fields`),
    so they accept and refuse the same values. Raises a one-line :class:`ConfigError` naming the
    flag (``--batch-size: ...``) or the config key (``--config job.yaml: batch_size: ...``), and
    one listing the valid keys for an unknown config key.
    """
    from gradfix.cli.fields import command_options, registry_key

    options = command_options(command)
    config = {str(k).replace("-", "_"): v for k, v in _record_options(command, config, config_path).items()}
    unknown = sorted(set(config) - set(options))
    if unknown:
        valid = ", ".join(sorted(options))
        raise ConfigError(f"--config {config_path}: unknown option(s) {', '.join(unknown)}; valid: {valid}")
    defaults = {key: copy.copy(option.default) for key, option in options.items()}
    merged = {**defaults, **config, **cli}
    try:
        validated = _adapter(command, registry_key()).validate_python(merged)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = str(error["loc"][0])
        where = flag_of(key) if key in cli else f"--config {config_path}: {key}"
        if key == "data" and isinstance(merged[key], (list, tuple)) and not options[key].kind.many:
            raise ConfigError(
                f"{where}: {command} takes one data file, got a list of {len(merged[key])}; "
                "only merge takes a list (one file per task)"
            ) from None
        raise ConfigError(f"{where}: {_refused(options[key].kind, merged[key], error['loc'])}") from None
    return {key: validated[key] for key in options}


def _record_options(command: str, config: Mapping[str, Any], path: str) -> Mapping[str, Any]:
    """``config`` itself, or the options of a ``gradfix.json`` record given as ``--config``.

    A record (it holds ``command`` and ``gradfix_version``) replays through the options it keeps,
    the same as the ``gradfix.yaml`` beside it, when it is a record of ``command``.
    """
    if "command" not in config or "gradfix_version" not in config:
        return config
    recorded = config["command"]
    if recorded != command:
        raise ConfigError(
            f"--config {path}: this is the record of a gradfix {recorded} run; replay it with "
            f"gradfix {recorded} --config {path}"
        )
    options = config.get("options")
    if not isinstance(options, Mapping):
        raise ConfigError(
            f"--config {path}: this gradfix.json record holds no options to replay (written before "
            "gradfix recorded them); give a YAML config of the options, as in a newer output's gradfix.yaml"
        )
    return options


def validated_options(
    command: str, argv: Sequence[str], yaml_mapping: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The validated options of ``gradfix <command> <argv>`` with ``yaml_mapping`` as its ``--config``.

    Without ``yaml_mapping`` the ``--config`` file named in ``argv`` (if any) is read. This is
    the step :func:`gradfix.cli.main.main` runs before the job.
    """
    from gradfix.cli.main import build_parser

    args = build_parser().parse_args([command, *argv])
    path = args.config or "config"
    if yaml_mapping is None:
        yaml_mapping = load_config(args.config) if args.config else {}
    return validate_options(command, given_options(args), yaml_mapping, path)


def fill_unset(args: argparse.Namespace, config: Mapping[str, Any], path: str) -> argparse.Namespace:
    """``args`` with the options the command line left unset taken from ``config`` (``inspect``, ``zoo``).

    Unknown config keys are an error that lists the valid ones.
    """
    known = set(vars(args)) - _NOT_OPTIONS - {"zoo_command"}
    unknown = sorted(set(config) - known)
    if unknown:
        valid = ", ".join(sorted(known))
        raise ConfigError(f"--config {path}: unknown option(s) {', '.join(unknown)}; valid: {valid}")
    merged = vars(args).copy()
    merged.update({k: v for k, v in config.items() if merged.get(k) in (None, [])})
    return argparse.Namespace(**merged)


def flag_of(key: str) -> str:
    """The command-line flag of the option ``key`` (``batch_size`` → ``--batch-size``)."""
    return _FLAGS.get(key, "--" + key.replace("_", "-"))


def _refused(kind: Any, value: Any, loc: tuple[Any, ...]) -> str:
    """What the error says about ``value``: the offending element of a list, else the value."""
    from gradfix.cli.schema import expected_of

    if kind.many and len(loc) > 1 and isinstance(loc[1], int) and isinstance(value, (list, tuple)):
        value = value[loc[1]] if loc[1] < len(value) else value
    return expected_of(kind, value)


@cache
def _adapter(command: str, key: tuple[tuple[str, ...], ...]) -> TypeAdapter[dict[str, Any]]:
    """The pydantic validator of ``command``'s options (for the registries' names ``key``)."""
    from gradfix.cli.fields import command_options

    kinds = {key: option.kind.annotation for key, option in command_options(command).items()}
    # A TypedDict class built at run time, from fields a type checker cannot know: called through an
    # untyped name so that the checker sees a value of unknown type, not a malformed TypedDict.
    typed_dict: Any = TypedDict
    options = typed_dict(f"{command.capitalize()}Options", kinds)
    options.__pydantic_config__ = ConfigDict(strict=True, extra="forbid")
    return TypeAdapter(options)
