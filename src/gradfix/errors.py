"""Exceptions raised by gradfix. Every message names the file, tensor or row at fault.

Messages are single lines: a summary first, then details separated by ``;``. The command line
prints them as ``gradfix <command>: error: <message>`` and exits with status 2.
"""

from __future__ import annotations


class GradfixError(Exception):
    """Base class of every error gradfix raises on bad input."""


class CheckpointError(GradfixError):
    """A checkpoint is missing, unreadable, unsafe or malformed."""


class NonFiniteError(CheckpointError):
    """A checkpoint (or a votes file) holds NaN or Inf values, or a result would."""


class MismatchError(GradfixError):
    """Tensor names or shapes differ between models that must share an architecture."""


class DataError(GradfixError):
    """A data file is missing, empty or malformed, or a label is unknown."""


class ConfigError(GradfixError, ValueError):
    """A command-line option or configuration value is missing or invalid."""


class OutputError(GradfixError):
    """The output could not be written (full disk, no permission, ...); nothing was left behind."""
