"""Unlabelled text for continued pre-training: the docstrings of Python's standard library.

Every machine with Python has them, and they share nothing with the downstream news tasks. Files
are read in sorted order and parsed with :mod:`ast` (never imported); each docstring of a module,
class or function is split into paragraphs, whitespace is collapsed, and paragraphs with fewer
than ``min_words`` words or containing code (``>>>``) are skipped. The result is deduplicated in
first-seen order, so the same Python installation always gives the same list.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from gradfix.errors import DataError

SKIPPED_DIRS = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__", "turtledemo"}
)
_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_folder() -> Path:
    """The folder of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def python_files(root: str | Path) -> list[Path]:
    """``.py`` files under ``root`` in sorted order, skipping tests, IDLE and third-party folders."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.startswith("."))
        found.extend(Path(folder) / name for name in sorted(files) if name.endswith(".py"))
    return found


def parsed_files(root: str | Path) -> Iterator[tuple[Path, ast.Module]]:
    """Each file of :func:`python_files` with its syntax tree (parsed, never imported), in order;
    files that cannot be read or parsed are skipped."""
    for path in python_files(root):
        try:
            yield path, ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue


def paragraphs(doc: str, min_words: int) -> list[str]:
    """The paragraphs of ``doc`` (whitespace collapsed) with ``min_words`` words or more and no code."""
    out = []
    for block in doc.split("\n\n"):
        flat = " ".join(block.split())
        if len(flat.split()) >= min_words and ">>>" not in flat:
            out.append(flat)
    return out


def docstring_paragraphs(root: str | Path | None = None, min_words: int = 6) -> list[str]:
    """Deduplicated docstring paragraphs of every Python file under ``root`` (default: the stdlib).

    Files that cannot be read or parsed are skipped. Raises :class:`DataError` if none is found.
    """
    folder = Path(root) if root is not None else stdlib_folder()
    seen: dict[str, None] = {}
    for _, tree in parsed_files(folder):
        for node in ast.walk(tree):
            if isinstance(node, _NODES):
                doc = ast.get_docstring(node)
                if doc:
                    seen.update(dict.fromkeys(paragraphs(doc, min_words)))
    if not seen:
        raise DataError(f"{folder}: no docstrings found")
    return list(seen)


def corpus_digest(texts: list[str]) -> str:
    """sha256 of the texts joined by newlines: identifies the corpus in a manifest."""
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()
