"""Stand-ins for the ``cython`` names ``_hot`` uses, when Cython is not installed.

Plain Python then runs ``_hot.py`` as written: the decorator returns the class as it is.
"""

from __future__ import annotations

from typing import TypeVar

_C = TypeVar("_C", bound=type)
_V = TypeVar("_V")
_F = TypeVar("_F")

#: Never compiled: this module only exists for the pure-Python fallback.
compiled = False
#: The C type names ``_hot`` declares at module level (the rest sit in compiled branches).
bint = bool
double = float
Py_ssize_t = int


def cclass(cls: _C) -> _C:
    """Leave the class as written (Cython would make it an extension type)."""
    return cls


def declare(kind: object, value: _V) -> _V:
    """Return ``value`` (Cython would declare a C variable of type ``kind``)."""
    return value


def cfunc(func: _F) -> _F:
    """Leave the function as written (Cython would make it a C function)."""
    return func


def inline(func: _F) -> _F:
    """Leave the function as written (Cython would inline the C function)."""
    return func


def ccall(func: _F) -> _F:
    """Leave the function as written (Cython would make it callable from C and Python)."""
    return func


def cast(kind: object, value: _V) -> _V:
    """Return ``value`` (Cython would treat it as a ``kind`` without a check)."""
    return value
