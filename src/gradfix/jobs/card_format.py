"""How a model card writes single values: numbers, shares, gate thresholds, table cells, file names.

Shared by the card's sections (:mod:`gradfix.jobs.card`, :mod:`gradfix.jobs.card_result`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any


def file_name(entry: Mapping[str, Any]) -> str:
    """The file or folder name of an input entry's ``path``."""
    return PurePath(str(entry.get("path", ""))).name


def cell(text: object) -> str:
    """``text`` made safe for a Markdown table cell (``|`` escaped)."""
    return str(text).replace("|", "\\|")


def num(value: Any) -> str:
    """A number to 4 significant digits (``inf``/``nan`` as they are); anything else as ``str``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def threshold_text(threshold: float) -> str:
    """A gate threshold as the card writes it: ``naive`` above 1, else the number."""
    return "naive" if threshold > 1 else f"{threshold:g}"


def pct(share: Any) -> str:
    """A share in [0, 1] as a percentage with two decimals; ``-`` when it is not a number."""
    return f"{100 * float(share):.2f} %" if isinstance(share, (int, float)) else "-"
