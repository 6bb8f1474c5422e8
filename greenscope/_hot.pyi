# Typing for _hot.py, which stays untyped so that Cython compiles it as plain Python
# objects (annotations in a cclass would declare C fields).
from typing import Any

__all__ = ["RegistryHit", "ScopedHit", "compiled"]

compiled: bool

class RegistryHit:
    _key: str
    def __call__(self) -> Any: ...

class ScopedHit:
    _greenscope_key: str | None
    def __call__(self, **kw: Any) -> Any: ...
