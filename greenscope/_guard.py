"""The engine guard: no connection is ever reset with I/O inside the gevent hub.

A ``Session`` or ``Connection`` nobody closed is freed by the garbage collector, and
SQLAlchemy's pool then resets (rolls back) its connection from that GC callback. When the
pass runs in the gevent hub the ROLLBACK cannot block: it fails with
``BlockingSwitchOutError``, the pool logs ``Exception during reset or similar`` and
invalidates the connection, and a pure-Python driver may be left with a half-written
message (gevent#1937, still open; gunicorn#2586, python-oracledb#42). greenscope closes
the Sessions its registries hold before that can happen; the guard covers the rest: a
``Session(engine)`` made directly, ``engine.connect()`` in a background greenlet, a
library's own connections.

How: the guard takes over the pool's reset-on-return and decides *where* it runs.

* Not in the hub (every ordinary greenlet and thread, a GC pass in one included): the
  reset is SQLAlchemy's own, as configured (``pool_reset_on_return``: ``"rollback"``,
  ``"commit"`` or ``None``), unchanged.
* In the hub: nothing is done there that could block. The connection is taken out of
  the pool (its pool record goes back *empty*: the next checkout connects anew, so the
  slot is free at once and nobody can be handed the connection before it is reset),
  and greenscope's cleanup rolls it back and closes it in a greenlet of the same hub,
  with the usual deadline (``close_timeout``). We chose this over closing it on the
  spot without a round trip: with pg8000 or PyMySQL a ``close()`` writes a Terminate
  message through gevent's sockets, which is I/O in the hub too; handed off, every
  driver's rollback and close run where they may block, and the server ends the
  transaction at once instead of when it notices the dropped socket. One WARNING names
  the leak (rate-limited like orphan warnings) and ``greenscope.stats().rescued``
  counts it.

What it relies on that is private to SQLAlchemy, checked on 2.0 and 2.1 by the tests:
``pool._reset_on_return`` (set to ``reset_none`` so that the pool's own reset does
nothing; ``Pool.recreate()`` carries it, and the listener, to the pool a ``dispose()``
makes) and ``_ConnectionRecord.dbapi_connection`` (set to None so the record reconnects,
as an invalidation does). The ``reset`` event (``PoolResetState``) cannot stop the
pool's own rollback, and a GC-time reset of a sync dialect looks like any other
check-in: hence detecting the hub directly.

Not covered: your own ``reset`` listeners still run where the reset happens, in the hub
too: a listener that does I/O fails there. Async dialects are out of scope: SQLAlchemy
never resets their connections from a GC callback (it terminates or drops them).
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from greenlet import getcurrent
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool
from sqlalchemy.pool.base import reset_commit, reset_none, reset_rollback

from greenscope import _cleanup
from greenscope._log import RateLimited

__all__ = ["guard_engine", "guarded", "rescued"]

logger = logging.getLogger("greenscope")

_warnings = RateLimited(
    "connections rescued from the hub", lambda: _cleanup.settings().orphan_warnings_per_minute
)


class _Count:
    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


_rescued = _Count()
_opted_out: weakref.WeakSet[Engine] = weakref.WeakSet()


def rescued() -> int:
    """Connections the guard took out of the pool in the hub, in this process."""
    return _rescued.n


class _Guard:
    """The ``reset`` listener of one engine's pool (carried to the pools it recreates)."""

    __slots__ = ("__weakref__", "dialect", "label", "original")

    def __init__(self, engine: Engine, original: Any) -> None:
        self.dialect = engine.dialect
        self.original = original
        self.label = engine.url.render_as_string(hide_password=True)

    def __call__(self, dbapi_connection: Any, record: Any, reset_state: Any) -> None:
        if not reset_state.asyncio_safe or dbapi_connection is None:
            return
        if record is not None and record.dbapi_connection is None:
            return  # taken out of the pool already (a cut cleanup job's connection)
        hub = _cleanup.hub_if_exists()
        if hub is not None and getcurrent() is hub:
            self._rescue(dbapi_connection, record, hub)
            return
        original = self.original  # SQLAlchemy's own reset, exactly as _ConnectionFairy._reset
        if original is reset_rollback:
            if not reset_state.transaction_was_reset:
                self.dialect.do_rollback(dbapi_connection)
        elif original is reset_commit:
            self.dialect.do_commit(dbapi_connection)

    def _rescue(self, dbapi_connection: Any, record: Any, hub: Any) -> None:
        # In the hub: dict and attribute operations only; the I/O goes to a greenlet.
        if record is not None:
            record.dbapi_connection = None  # checked in empty: the next checkout connects
        _rescued.n += 1
        _cleanup.submit(_Rescue(self, dbapi_connection), _cleanup.get_ident(), hub)


class _Rescue:
    """A cleanup job: roll back and close a connection taken out of the pool in the hub."""

    __slots__ = ("connection", "guard")

    def __init__(self, guard: _Guard, connection: Any) -> None:
        self.guard = guard
        self.connection = connection

    def __call__(self) -> None:
        guard, connection = self.guard, self.connection
        _warnings.warn(
            guard.label,
            "greenscope: a connection of engine %s was returned to its pool inside the "
            "gevent hub (a Session or Connection nobody closed, freed by garbage "
            "collection there), where its rollback cannot run (gevent#1937). greenscope "
            "took it out of the pool and rolls it back and closes it in a greenlet. Close "
            "Sessions and Connections explicitly (`with Session(engine) as s:`, "
            "`with engine.connect() as c:`) or use greenscope.scoped_session.",
            guard.label,
        )
        try:
            try:
                guard.dialect.do_rollback(connection)
            finally:
                guard.dialect.do_close(connection)
        except Exception:
            logger.warning(
                "greenscope: rolling back or closing a connection rescued from the hub "
                "failed (the database ends its transaction when the connection goes)",
                exc_info=True,
            )
        finally:
            self.connection = None

    def cut(self) -> None:
        _cleanup.shutdown_sockets([self.connection])


def _guards(pool: Pool) -> list[_Guard]:
    return [fn for fn in pool.dispatch.reset if isinstance(fn, _Guard)]


def guarded(engine: Engine) -> bool:
    """True if ``engine``'s pool is guarded (see :func:`guard_engine`)."""
    return bool(_guards(engine.pool))


def guard_engine(engine: Any, *, enabled: bool = True) -> Engine:
    """Never reset a connection of ``engine`` with I/O inside the gevent hub; return it.

    From then on, a connection checked back in *while the current greenlet is the gevent
    hub* (a ``Session`` or ``Connection`` nobody closed, freed by a garbage-collection
    pass or a callback that runs there) is taken out of the pool and rolled back and
    closed by greenscope in a greenlet, with a WARNING, instead of failing with
    ``BlockingSwitchOutError`` (gevent#1937). Everywhere else the reset is SQLAlchemy's
    own (``pool_reset_on_return``), unchanged. Idempotent. Every engine greenscope
    knows is guarded automatically (those behind its registries, ``greenscope.flask``'s,
    and :func:`greenscope.register_engine`'s); ``enabled=False`` removes the guard and
    keeps greenscope from adding it again. See the guarantees in the documentation
    (``docs/guarantees.md``).

    .. versionadded:: 0.2
    """
    if not isinstance(engine, Engine):
        sync = getattr(engine, "sync_engine", None)
        if isinstance(sync, Engine):
            raise TypeError(
                f"greenscope.guard_engine() got {type(engine).__name__}: async dialects "
                "need no guard (SQLAlchemy never resets their connections from a "
                "garbage-collection callback)"
            )
        raise TypeError(
            "greenscope.guard_engine(engine) takes an Engine made by "
            f"sqlalchemy.create_engine(); got {engine!r}"
        )
    pool = engine.pool
    existing = _guards(pool)
    if not enabled:
        _opted_out.add(engine)
        for guard in existing:
            event.remove(engine, "reset", guard)
            pool._reset_on_return = guard.original
        return engine
    _opted_out.discard(engine)
    if existing or engine.dialect.is_async:
        return engine
    _cleanup.prepare()  # the watchdog guards rescues too, and may not be running yet
    guard = _Guard(engine, pool._reset_on_return)
    event.listen(engine, "reset", guard)
    pool._reset_on_return = reset_none
    return engine


def auto_guard(engine: Engine) -> None:
    """Guard an engine greenscope just learned about, unless it was opted out."""
    if engine not in _opted_out and not engine.dialect.is_async:
        guard_engine(engine)
