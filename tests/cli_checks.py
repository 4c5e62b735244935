"""What the command-line tests share: the tiny models of a transport, one-line errors, file hashes."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from tiny_models import make_tiny_bert, perturbed_copy, topic_examples, write_jsonl

from gradfix.cli.main import main


def transport_models(root: Path, wide: bool = False) -> dict[str, Path]:
    """A tiny BERT ``A``, its fine-tune ``A-ft``, another base ``B`` and labelled ``few`` examples
    (and, with ``wide``, a wider base ``wide``) under ``root``."""
    a = make_tiny_bert(root / "A", seed=0)
    models = {
        "A": a,
        "A-ft": perturbed_copy(a, root / "A-ft", 0.02, seed=1),
        "B": make_tiny_bert(root / "B", seed=3),
        "few": write_jsonl(root / "few.jsonl", topic_examples(4, seed=0)),
    }
    if wide:
        models["wide"] = make_tiny_bert(root / "wide", seed=4, hidden=48, heads=2)
    return models


def transport_args(
    m: dict[str, Any], out: Path, *extra: str, options: Sequence[str] = (), **roles: Any
) -> list[str]:
    """``gradfix transport`` from ``m``'s ``A``/``A-ft`` onto ``B`` voting on ``few`` (any of them
    replaced through ``roles``), with ``options`` before the output options and ``extra`` last."""
    paths = {"A": m["A"], "A-ft": m["A-ft"], "B": m["B"], "few": m["few"], **roles}
    return [
        "transport",
        "--source-base", str(paths["A"]),
        "--source-finetuned", str(paths["A-ft"]),
        "--target-base", str(paths["B"]),
        "--data", str(paths["few"]),
        *options,
        "--exclude", "pooler.*",
        "--out", str(out),
        "--no-progress",
        *extra,
    ]  # fmt: skip


def one_error_line(
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
    command: str = "transport",
    longest: int | None = None,
) -> str:
    """Run the CLI: status 2, no traceback, exactly one printable error line (returned), of at most
    ``longest`` characters when given."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("gradfix")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"gradfix {command}: error: ")
    assert err.rstrip("\n").endswith(lines[0])
    assert lines[0].isprintable(), lines[0]
    assert longest is None or len(lines[0]) <= longest, lines[0]
    return lines[0]


def file_hashes(*paths: Path) -> dict[str, str]:
    """The sha256 of every file of ``paths`` (files, or folders searched recursively)."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
