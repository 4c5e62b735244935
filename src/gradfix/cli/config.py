"""Options from a YAML config file, merged under the command line: CLI > config > defaults."""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from gradfix.errors import ConfigError

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


def merge_config(
    args: argparse.Namespace,
    config: Mapping[str, Any],
    defaults: Mapping[str, Any],
    path: str,
    extra_keys: tuple[str, ...] = (),
) -> argparse.Namespace:
    """Fill every option the command line left unset from ``config``, then from ``defaults``.

    Unknown config keys are an error that lists the valid ones. List options accept a single
    value or a YAML list.
    """
    known = set(vars(args)) - {"command", "config", "handler"}
    unknown = sorted(set(config) - known - set(extra_keys))
    if unknown:
        valid = ", ".join(sorted(known | set(extra_keys)))
        raise ConfigError(f"{path}: unknown option(s) {', '.join(unknown)}; valid: {valid}")
    merged = vars(args).copy()
    for key, value in config.items():
        if key in known and merged.get(key) in (None, []):
            merged[key] = value
    for key, value in defaults.items():
        if merged.get(key) is None:
            merged[key] = value
    for key in extra_keys:
        merged.setdefault(key, config.get(key))
    return argparse.Namespace(**merged)


def as_list(value: Any) -> list[Any]:
    """``None`` → ``[]``, a scalar → ``[scalar]``, a list → itself."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
