"""Stand-ins for the ``cython`` names ``_hot`` uses, when Cython is not installed.

Plain Python then runs ``_hot.py`` as written: the decorator returns the class as it is.
"""

from __future__ import annotations

from typing import TypeVar

_C = TypeVar("_C", bound=type)
_V = TypeVar("_V")

#: Never compiled: this module only exists for the pure-Python fallback.
compiled = False


def cclass(cls: _C) -> _C:
    """Leave the class as written (Cython would make it an extension type)."""
    return cls


def declare(kind: object, value: _V) -> _V:
    """Return ``value`` (Cython would declare a C variable of type ``kind``)."""
    return value
