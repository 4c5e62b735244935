"""Exceptions raised by gradfix. Every message names the file, tensor or row at fault."""

from __future__ import annotations


class GradfixError(Exception):
    """Base class of every error gradfix raises on bad input."""


class CheckpointError(GradfixError):
    """A checkpoint is missing, unreadable, unsafe or malformed."""


class MismatchError(GradfixError):
    """Tensor names or shapes differ between models that must share an architecture."""


class DataError(GradfixError):
    """A data file is missing, empty or malformed, or a label is unknown."""


class ConfigError(GradfixError):
    """A command-line option or configuration value is missing or invalid."""
