"""Stand-ins for the ``cython`` names ``_hot`` uses, when Cython is not installed.

Plain Python then runs ``_hot.py`` as written: the decorator returns the class as it is.
"""

from __future__ import annotations

from typing import TypeVar

_C = TypeVar("_C", bound=type)

#: Never compiled: this module only exists for the pure-Python fallback.
compiled = False


def cclass(cls: _C) -> _C:
    """Leave the class as written (Cython would make it an extension type)."""
    return cls
