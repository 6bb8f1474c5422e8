# Typing for _hot.py, which stays untyped so that Cython compiles it as plain Python
# objects (annotations in a cclass would declare C fields).
import weakref
from collections.abc import Callable
from typing import Any

__all__ = [
    "Counts",
    "Flag",
    "RegistryHit",
    "ScopedHit",
    "Watch",
    "bind",
    "compiled",
    "forget",
    "new_watch",
    "on_completion",
]

compiled: bool

class RegistryHit:
    _key: str
    def __call__(self) -> Any: ...

class ScopedHit:
    _greenscope_key: str | None
    def __call__(self, **kw: Any) -> Any: ...
    def remove(self) -> None: ...

class Flag:
    done: bool

class Counts:
    shut_down: bool
    live: int
    created: int
    removed: int
    reaped: int
    failed: int
    timed_out: int
    def __init__(self, shut_down: bool = False) -> None: ...

class Watch:
    ref: weakref.ref[Any]
    r1: Any
    v1: Any
    more: Any
    gtype: Any
    hub: Any
    how: Any
    name: Any
    gid: int
    thread: int
    main: bool
    rawlinked: bool
    def __call__(self, ref: weakref.ref[Any]) -> None: ...

def bind(
    *,
    live: set[Any],
    watch_type: type[Watch],
    registry_type: type,
    session_type: type,
    invalidate_opened: Callable[[Any], None],
    gevent_greenlet: type | None,
    get_hub: Callable[[], Any] | None,
    get_ident: Callable[[], int],
    prepared: Flag,
    debugging: Flag,
    watch_key: str,
    ordered: Flag,
) -> None: ...
def new_watch(g: Any) -> Any: ...
def on_completion(g: Any) -> None: ...
def forget(registry: Any, d: dict[str, Any]) -> None: ...

# Visible in the pure-Python module only (compiled, a C function): tests trace it.
def _forget(registry: Any, d: dict[str, Any], key: str) -> None: ...
