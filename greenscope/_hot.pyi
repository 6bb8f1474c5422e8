# Typing for _hot.py, which stays untyped so that Cython compiles it as plain Python
# objects (annotations in a cclass would declare C fields).
import weakref
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "Counts",
    "Flag",
    "HubQueue",
    "Reap",
    "RegistryHit",
    "ScopedHit",
    "Tally",
    "Watch",
    "WatchTable",
    "bind",
    "bind_cleanup",
    "bind_settings",
    "compiled",
    "drain",
    "forget",
    "hub_submit",
    "new_watch",
    "on_completion",
    "record_end",
    "run_job",
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
    default_close: bool
    key: str | None
    live: int
    created: int
    removed: int
    reaped: int
    failed: int
    timed_out: int
    def __init__(self, shut_down: bool = False) -> None: ...

class Tally:
    count: int

class WatchTable:
    running: dict[Any, tuple[float, Callable[[Any], bool]]]
    sleep_until: float

class HubQueue:
    hub: Any
    jobs: Any
    put: Callable[[Any], None]
    take: Callable[[], Any]
    running: int
    fill_scheduled: bool

class Reap:
    registry: Any
    counts: Counts
    value: Any
    _owner: Any
    claims: Sequence[Any]
    orphan: bool
    warn: bool
    reraise: bool
    done: bool
    def __init__(
        self, registry: Any, value: Any, owner: Any, orphan: bool, reraise: bool = False
    ) -> None: ...
    @property
    def owner(self) -> str: ...
    def cut(self) -> None: ...
    def __call__(self) -> None: ...

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
    changing: set[Any],
    submit: Callable[[Any, int | None, Any | None], None],
    warn_enabled: Callable[[int], bool],
    claim: Callable[[list[Any]], list[Any]],
    release: Callable[[list[Any]], None],
    opened_dbapi: Callable[[Any], list[Any]],
    close_failed: Callable[[Any, Any, Any, BaseException], None],
    close_deadline: type[BaseException],
    reap_warn: Callable[[Reap], None],
    reap_cut: Callable[[Reap], None],
    claims_of: Callable[[Any], list[Any]],
) -> None: ...
def bind_cleanup(
    *,
    pending: Tally,
    generation: Tally,
    watchdog: WatchTable,
    monotonic: Callable[[], float],
    logger: Any,
    log_exception: Callable[[str], None],
) -> None: ...
def bind_settings(close_timeout: float, max_concurrent_closes: int) -> None: ...
def record_end(watch: Watch, g: Any) -> bool: ...
def run_job(job: Any, on_cut: Callable[[Any], bool]) -> bool: ...
def drain(reaper: HubQueue, on_cut: Callable[[Any], bool]) -> bool: ...
def hub_submit(reaper: HubQueue, job: Any) -> None: ...
def new_watch(g: Any) -> Any: ...
def on_completion(g: Any) -> None: ...
def forget(registry: Any, d: dict[str, Any]) -> None: ...

# Visible in the pure-Python module only (compiled, a C function): tests trace it.
def _forget(registry: Any, d: dict[str, Any], key: str) -> None: ...
