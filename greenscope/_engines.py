"""The engines greenscope knows: one list for fork safety, the gunicorn and Celery hooks,
the engine guard and the doctor.

An engine is known when it is

* behind a greenscope registry: bound by the registry's ``sessionmaker`` (``bind=`` and
  ``binds={...}``), or made by an integration that registers it (``greenscope.flask``'s
  Flask-SQLAlchemy engines);
* or registered by the application with :func:`register_engine`.

Known engines get a fresh pool in every forked child (``os.register_at_fork``), whoever
forks: gunicorn's master, Celery's prefork pool, ``multiprocessing``. A connection's
socket is shared with the parent after fork: two processes speaking on one PostgreSQL
connection mix their protocol messages and transactions.

Engines are held weakly: registering one never keeps it alive.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from typing import Any

from sqlalchemy.engine import Engine

from greenscope import _cleanup, _guard

__all__ = ["dispose_after_fork", "engines_of", "known_engines", "register_engine"]

_REGISTERED: weakref.WeakSet[Engine] = weakref.WeakSet()


def register_engine(engine: Any, *, guard: bool = True) -> Engine:
    """Tell greenscope about an engine its registries cannot see; return it.

    A registered engine gets what the engines behind greenscope's registries get: a
    fresh pool in a forked child (gunicorn's ``--preload``, Celery's prefork pool,
    ``multiprocessing``), the engine guard (:func:`greenscope.guard_engine`; pass
    ``guard=False`` to leave it out) and the doctor's checks. Idempotent; held by a weak
    reference. For an ``AsyncEngine`` pass its ``sync_engine``.

    .. versionadded:: 0.2
    """
    if not isinstance(engine, Engine):
        sync = getattr(engine, "sync_engine", None)
        hint = (
            f" It looks like an AsyncEngine: pass {type(engine).__name__}.sync_engine."
            if isinstance(sync, Engine)
            else ""
        )
        raise TypeError(
            "greenscope.register_engine(engine) takes an Engine made by "
            f"sqlalchemy.create_engine(); got {engine!r}.{hint}"
        )
    _REGISTERED.add(engine)
    _cleanup.prepare()  # ordinary code: the cleanup threads exist before any rescue
    if guard:
        _guard.auto_guard(engine)
    return engine


def engines_of(factory: Any) -> Iterator[Engine]:
    """The engines a ``sessionmaker`` binds (``bind=`` and ``binds={...}``), once each."""
    kw = getattr(factory, "kw", None)
    if not isinstance(kw, dict):
        return
    binds = [kw.get("bind"), *(kw.get("binds") or {}).values()]
    seen: set[int] = set()
    for bind in binds:
        engine = getattr(bind, "engine", None)  # an Engine or a Connection
        if isinstance(engine, Engine) and id(engine) not in seen:
            seen.add(id(engine))
            yield engine


def known_engines() -> list[Engine]:
    """Every engine greenscope knows (see the module docstring), once each."""
    from greenscope._registry import registries  # noqa: PLC0415 - avoids an import cycle

    found: dict[int, Engine] = {id(e): e for e in list(_REGISTERED)}
    for registry in registries():
        for engine in engines_of(registry.createfunc):
            found.setdefault(id(engine), engine)
    return list(found.values())


def dispose_after_fork() -> None:
    """In a forked child: give every known engine a fresh pool, never touching the old one.

    ``engine.dispose(close=False)`` is SQLAlchemy's recipe for a forked child. The old
    pool is then pinned rather than dropped: freed, its connections would be finalized
    by their driver, and some drivers (psycopg2's ``PQfinish`` on dealloc) then send a
    Terminate message on the socket the parent still uses. Runs once per child.
    In-memory SQLite engines are left alone: the child's copy is its own.
    """
    if _disposed.pid == os.getpid():
        return
    _disposed.pid = os.getpid()
    old_pools: list[Any] = []
    for engine in known_engines():
        if _in_memory(engine):
            continue  # the child's copy of the database is its own: nothing shared
        old_pools.append(engine.pool)
        engine.dispose(close=False)
    _cleanup.pin_forever(old_pools)


def _in_memory(engine: Engine) -> bool:
    """An in-memory SQLite database: it lives in the process, copied by fork, and a fresh
    pool would open an empty one (``multiprocessing`` children read their copy)."""
    url = engine.url
    if url.get_backend_name() != "sqlite":
        return False
    database = url.database or ""
    return database in {"", ":memory:"} or "mode=memory" in str(url.query.get("mode", ""))


class _Disposed:
    __slots__ = ("pid",)

    def __init__(self) -> None:
        self.pid = os.getpid()


_disposed = _Disposed()

os.register_at_fork(after_in_child=dispose_after_fork)
