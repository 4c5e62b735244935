"""Transport methods as registered objects: naive, gradfix, adaptive, transfusion, theseus.

:data:`METHODS` maps each name to its :class:`Method`; :func:`resolve_method` fills in the
settings that depend on the method. The command line's ``--method`` choices and help come from
this table. Importing this package registers every method.
"""

# importing a method's file registers it; this order is the command line's
from gradfix.methods import adaptive  # noqa: F401  # isort: skip
from gradfix.methods import gradfix  # noqa: F401  # isort: skip
from gradfix.methods import naive  # noqa: F401  # isort: skip
from gradfix.methods import aligned  # noqa: F401  # isort: skip
from gradfix.methods.registry import (
    AUTO,
    METHODS,
    Method,
    fixed_alpha,
    get_method,
    is_auto,
    register_method,
    resolve_method,
)

__all__ = [
    "AUTO",
    "METHODS",
    "Method",
    "fixed_alpha",
    "get_method",
    "is_auto",
    "register_method",
    "resolve_method",
]
