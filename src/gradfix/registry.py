"""One registry type for every extensible concept: methods, masks, recipes.

A :class:`Registry` is a ``dict`` from name to object (so ``name in REGISTRY``, ``list(REGISTRY)``
and ``REGISTRY[name]`` work as for any mapping) that refuses a name registered twice and answers an
unknown name with a :class:`~gradfix.errors.ConfigError` listing the choices.
"""

from __future__ import annotations

from typing import TypeVar

from gradfix.errors import ConfigError

T = TypeVar("T")


class Registry(dict[str, T]):
    """Registered objects of one kind, by name, in registration order."""

    def __init__(self, kind: str, choices: str = "choose one of"):
        super().__init__()
        self.kind = kind
        self.choices = choices

    def register(self, name: str, item: T) -> T:
        """Add ``item`` under ``name``; a ``ValueError`` if the name is taken."""
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self[name] = item
        return item

    def lookup(self, name: object) -> T:
        """The object registered as ``name``; a :class:`ConfigError` listing the choices otherwise."""
        if isinstance(name, str) and name in self:
            return self[name]
        raise ConfigError(f"unknown {self.kind} {name!r}; {self.choices} {', '.join(self)}")
