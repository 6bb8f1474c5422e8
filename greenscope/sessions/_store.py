"""``SQLAlchemyStore``: server-side HTTP session data in a SQL table, in its own Session.

Why its own Session: a store that ran on the application's Session (Flask-Session's
SQLAlchemy backend does, on ``db.session``) commits whatever the view left pending when
it saves the HTTP session, commits it again when it deletes an expired record on load,
and rolls it back on an error. Here every call runs in a greenscope registry of the
store's own (:func:`greenscope.session_scope`, ``commit=True``): a Session separate from
every application Session in the same greenlet, with its own transaction and its own
pooled connection, committed (or rolled back) and removed before the call returns. The
application's Session is never flushed, committed or rolled back by the store.

What that costs: a second pooled connection while a call runs, next to the one the
request's own Session may hold. Size the pool for it (the doctor counts it: see the
sessions guide).

SQLite allows one writer at a time. A write of the store while this greenlet's own
application transaction holds SQLite's write lock on the same database file would wait
for a lock that only this greenlet can release: it is refused at once, with what to do.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import weakref
from typing import Any, Generic, TypeVar

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from greenscope import _engines, _registry
from greenscope._scoping import scoped_session, session_scope
from greenscope.sessions._model import SessionModelMixin, utcnow

__all__ = ["SQLAlchemyStore", "stores_on"]

_M = TypeVar("_M", bound=SessionModelMixin)

MAX_ID_LENGTH = 255


def _check_id(session_id: object, call: str) -> str:
    if not isinstance(session_id, str):
        raise TypeError(
            f"SQLAlchemyStore.{call} takes a str session id; got {type(session_id).__name__}"
        )
    if not session_id:
        raise ValueError(f"SQLAlchemyStore.{call} takes a non-empty session id")
    if len(session_id) > MAX_ID_LENGTH:
        raise ValueError(
            f"SQLAlchemyStore.{call}: a session id has at most {MAX_ID_LENGTH} characters; "
            f"got {len(session_id)}"
        )
    if not _ID.fullmatch(session_id):
        # Visible ASCII only: no NUL (PostgreSQL refuses it), and no spaces, which
        # MySQL's PAD SPACE collations would ignore at the end of an id.
        raise ValueError(
            f"SQLAlchemyStore.{call} takes a session id of visible ASCII characters (no "
            f"spaces or control characters); got {session_id!r}"
        )
    return session_id


_ID = re.compile(r"[\x21-\x7e]+")
# Browsers keep a cookie at most 400 days (RFC 6265bis); a Max-Age is whole seconds.
MAX_AGE_LIMIT = dt.timedelta(days=400)


def _check_max_age(max_age: object, call: str, minimum: dt.timedelta) -> dt.timedelta:
    if not isinstance(max_age, dt.timedelta):
        raise TypeError(
            f"{call} takes max_age as a datetime.timedelta; got {type(max_age).__name__}"
        )
    if max_age < minimum or max_age <= dt.timedelta(0) or max_age > MAX_AGE_LIMIT:
        least = "1 second" if minimum else "more than 0"
        raise ValueError(
            f"{call} takes a max_age from {least} to 400 days (browsers keep a cookie 400 "
            f"days at most); got {max_age!r}"
        )
    return max_age


# Every store of the process, weakly: the doctor counts the connections they add.
_STORES: weakref.WeakSet[SQLAlchemyStore[Any]] = weakref.WeakSet()


def stores_on(engine: Engine) -> int:
    """How many stores of this process use ``engine``: each may take one more connection
    per request, next to the application's."""
    return sum(
        1
        for store in list(_STORES)
        if any(e is engine for e in _engines.engines_of(store.Session.session_factory))
    )


class SQLAlchemyStore(Generic[_M]):
    """HTTP session data in ``model``'s table, through ``bind``: an Engine or a sessionmaker.

    ``max_age``: how long a session lives after its last :meth:`set`. Every method runs
    in the store's own Session and commits its own transaction (see the module's
    docstring); each may be called from any greenlet or thread.

    .. versionadded:: 0.3
    """

    def __init__(
        self, bind: Engine | sessionmaker[Any], model: type[_M], *, max_age: dt.timedelta
    ):
        if isinstance(bind, Engine):
            factory: sessionmaker[Any] = sessionmaker(bind, expire_on_commit=False)
        elif isinstance(bind, sessionmaker):
            factory = bind
        else:
            raise TypeError(
                "greenscope.sessions.SQLAlchemyStore(bind, ...) takes an Engine or a "
                f"sessionmaker; got {bind!r}"
            )
        if not (isinstance(model, type) and issubclass(model, SessionModelMixin)):
            raise TypeError(
                "greenscope.sessions.SQLAlchemyStore(bind, model, ...) takes a mapped "
                "subclass of SessionModelMixin (see create_session_model); got "
                f"{model!r}"
            )
        if "__mapper__" not in model.__dict__ and not hasattr(model, "__mapper__"):
            raise TypeError(
                f"greenscope.sessions.SQLAlchemyStore: {model.__qualname__} is not mapped: "
                "create it with create_session_model(base) or register_session_model(base, "
                "model)"
            )
        # At least a second: it is the cookie's Max-Age, in whole seconds (0 deletes it).
        self.max_age = _check_max_age(
            max_age, "greenscope.sessions.SQLAlchemyStore(...)", dt.timedelta(seconds=1)
        )
        self.model = model
        self.Session: scoped_session[Session] = scoped_session(factory)
        # Not request-scoped: every call removes its own Session before it returns.
        registry = self.Session.registry
        assert isinstance(registry, _registry.GreenletRegistry)
        registry.request_scoped = False
        _STORES.add(self)

    # -- the API ------------------------------------------------------------------------

    def get(self, session_id: str) -> bytes | None:
        """The data of ``session_id``, or None when it is missing or expired."""
        _check_id(session_id, "get(session_id)")
        row = self._get(session_id)
        return None if row is None else row[0]

    def _get(self, session_id: str) -> tuple[bytes, dt.datetime] | None:
        # The data and its expiry: the middleware decides from it whether to extend it.
        m = self.model
        query = select(m.data, m.expires_at).where(
            m.session_id == session_id, m.expires_at > utcnow()
        )
        with session_scope(self.Session, commit=True) as session:
            row = session.execute(query).first()
        return None if row is None else (bytes(row[0]), row[1])

    def touch(self, session_id: str, max_age: dt.timedelta | None = None) -> bool:
        """Extend a live session: its expiry becomes now + ``max_age`` (default: the
        store's), its data unchanged. False, and nothing written, for a session that is
        gone. The middleware calls it for sessions that are read but not changed, so that
        an active user is not logged out (see ``refresh_each_request``)."""
        _check_id(session_id, "touch(session_id)")
        return self._update_live(session_id, expires_at=utcnow() + self._age(max_age, "touch"))

    def set(
        self,
        session_id: str,
        data: bytes | bytearray | memoryview,
        max_age: dt.timedelta | None = None,
    ) -> None:
        """Store ``data`` for ``session_id``, replacing what was there and resetting its
        expiry to now + ``max_age`` (default: the store's). One atomic upsert: many
        greenlets setting one id at once leave one row, and no error."""
        _check_id(session_id, "set(session_id, data)")
        values = self._values(session_id, data, max_age, "set")
        with session_scope(self.Session, commit=True) as session:
            self._refuse_sqlite_self_lock(session)
            session.execute(self._upsert(session, values))

    def update(
        self,
        session_id: str,
        data: bytes | bytearray | memoryview,
        max_age: dt.timedelta | None = None,
    ) -> bool:
        """Like :meth:`set`, but only for a session that exists and has not expired:
        return False, and write nothing, for one that is gone. The middleware saves a
        known session this way, so that a request still running cannot bring back a
        session another request deleted (a log-out)."""
        _check_id(session_id, "update(session_id, data)")
        values = self._values(session_id, data, max_age, "update")
        return self._update_live(session_id, data=values["data"], expires_at=values["expires_at"])

    def _update_live(self, session_id: str, **values: Any) -> bool:
        # One UPDATE of a row that exists and has not expired: True if there was one.
        m = self.model
        query = (
            update(m)
            .where(m.session_id == session_id, m.expires_at > utcnow())
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        with session_scope(self.Session, commit=True) as session:
            self._refuse_sqlite_self_lock(session)
            result: Any = session.execute(query)
        return bool(result.rowcount)

    def delete(self, session_id: str) -> None:
        """Forget ``session_id`` (nothing happens if it is missing)."""
        _check_id(session_id, "delete(session_id)")
        m = self.model
        with session_scope(self.Session, commit=True) as session:
            self._refuse_sqlite_self_lock(session)
            session.execute(delete(m).where(m.session_id == session_id))

    def delete_all(self) -> None:
        """Forget every session of the table."""
        with session_scope(self.Session, commit=True) as session:
            self._refuse_sqlite_self_lock(session)
            session.execute(delete(self.model))

    def delete_expired(self) -> int:
        """Delete the sessions whose ``expires_at`` has passed; return how many.

        Run it now and then: from a background greenlet, a Celery beat task or cron (see
        ``deploy/sessions_cleanup.py``). Expired sessions are never returned by
        :meth:`get` meanwhile.
        """
        m = self.model
        with session_scope(self.Session, commit=True) as session:
            self._refuse_sqlite_self_lock(session)
            result: Any = session.execute(delete(m).where(m.expires_at <= utcnow()))
        return int(result.rowcount)

    def _values(
        self, session_id: str, data: object, max_age: dt.timedelta | None, call: str
    ) -> dict[str, Any]:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(
                f"SQLAlchemyStore.{call}(session_id, data) takes bytes (serialize the "
                f"session yourself, e.g. json.dumps(...).encode()); got {type(data).__name__}"
            )
        age = self._age(max_age, call)
        return {"session_id": session_id, "data": bytes(data), "expires_at": utcnow() + age}

    def _age(self, max_age: dt.timedelta | None, call: str) -> dt.timedelta:
        if max_age is None:
            return self.max_age
        return _check_max_age(max_age, f"{call}(max_age=...)", dt.timedelta(0))

    # -- dialects -----------------------------------------------------------------------

    def _upsert(self, session: Session, values: dict[str, Any]) -> Any:
        dialect = session.get_bind(self.model).dialect.name
        table = self.model.__table__  # type: ignore[attr-defined]
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert  # noqa: PLC0415

            pg = pg_insert(table).values(**values)
            return pg.on_conflict_do_update(
                index_elements=[table.c.session_id],
                set_={"data": pg.excluded.data, "expires_at": pg.excluded.expires_at},
            )
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert  # noqa: PLC0415

            lite = sqlite_insert(table).values(**values)
            return lite.on_conflict_do_update(
                index_elements=[table.c.session_id],
                set_={"data": lite.excluded.data, "expires_at": lite.excluded.expires_at},
            )
        if dialect in ("mysql", "mariadb"):
            from sqlalchemy.dialects.mysql import insert as mysql_insert  # noqa: PLC0415

            my = mysql_insert(table).values(**values)
            return my.on_duplicate_key_update(
                data=my.inserted.data, expires_at=my.inserted.expires_at
            )
        raise NotImplementedError(
            f"greenscope.sessions.SQLAlchemyStore: no atomic upsert for the {dialect!r} "
            "dialect yet (PostgreSQL, SQLite, MySQL and MariaDB are supported and tested)"
        )

    def _refuse_sqlite_self_lock(self, session: Session) -> None:
        """On SQLite, refuse a write this greenlet's own open write transaction would block.

        pysqlite opens a transaction only before a write, so a connection of this
        greenlet's application Sessions that is ``in_transaction`` on the same database
        file holds (or is about to take) the write lock.
        """
        engine = session.get_bind(self.model).engine
        if engine.dialect.name != "sqlite":
            return
        database = _sqlite_file(engine)
        for app_session in _registry.current_sessions():
            if app_session is session:
                continue
            for conn in _registry._opened_connections(app_session.get_transaction()):
                if conn.engine.dialect.name != "sqlite" or _sqlite_file(conn.engine) != database:
                    continue
                dbapi = getattr(conn.connection, "dbapi_connection", None)
                if getattr(dbapi, "in_transaction", False):
                    raise RuntimeError(
                        "greenscope.sessions: this greenlet's application Session holds "
                        f"SQLite's write lock on {database!r}, and SQLite allows one writer "
                        "at a time: the store's write would wait for this greenlet itself. "
                        "Commit (or roll back) the application's work before the HTTP "
                        "session is saved, or keep the sessions table in another database "
                        "file."
                    )


def _sqlite_file(engine: Engine) -> str:
    """The database file an SQLite engine opens, resolved: a relative and an absolute URL
    of one file name it the same. ``:memory:`` and ``""`` stay as they are."""
    database = engine.url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return database
    return os.path.realpath(database)
