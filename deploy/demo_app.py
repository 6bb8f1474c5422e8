"""The demo service: a plain WSGI app doing what real apps do to a Session.

Run it under gunicorn (see ``deploy/README.md``)::

    gunicorn -c deploy/gunicorn.conf.py --chdir deploy demo_app:app

Environment:

``DATABASE_URL``
    SQLAlchemy URL; default ``sqlite:///`` ``greenscope-demo.db`` next to this file.
``GREENSCOPE_DEMO_MODE``
    ``greenscope`` (default): ``greenscope.scoped_session``, removal by the worker.
    ``stock``: SQLAlchemy's ``scoped_session`` and no request-end removal, the setup
    greenscope replaces, to show what goes wrong.
``GREENSCOPE_DEMO_TABLE``
    table name; default ``demo_items``. Create it with :func:`create_schema` first.
``GREENSCOPE_DEMO_APP_NAME``
    PostgreSQL ``application_name`` of the engine's connections (default ``demo``);
    ``{pid}`` in it is replaced by the worker's process id, to tell workers apart.
``GREENSCOPE_DEMO_POOL_SIZE``, ``GREENSCOPE_DEMO_MAX_OVERFLOW``
    the engine's pool; default 20 and 80 (for ``worker_connections = 100``).
``GREENSCOPE_DEMO_IMPORT_QUERY``
    if set, query at import time and leave a Session open (the ``--preload`` hazard).
``GREENSCOPE_DEMO_PGBOUNCER``
    if set, ``DATABASE_URL`` points at PgBouncer in transaction mode: no server-side
    prepared statements (``prepare_threshold=None``; PgBouncer 1.18 cannot follow them)
    and no ``options`` startup parameter (PgBouncer refuses it; set such settings on the
    server role instead).
``GREENSCOPE_DEMO_DEADLINE``
    seconds a request may spend before it answers 503 (default: none). While the
    database is unreachable (PgBouncer ``PAUSE``, a failover) queries wait; a deadline
    makes requests fail fast instead of holding their greenlet and their connection.
``GREENSCOPE_DEMO_CONNECT_TIMEOUT``
    the driver's connect timeout in seconds (default 5).

Endpoints (``key`` is a unique string the client picks, so it can audit the table):

=========================  ==============================================================
``POST /write?key=K``      insert and commit; 201 acknowledges a stored write, 503 says
                           the commit's outcome is unknown (its answer was lost). The key
                           is an idempotency key: a write of a key already stored (a
                           client's or a load balancer's retry) answers 201 again with
                           the stored id and ``"replayed": true``, and stores nothing
``POST /fail?key=K``       insert, flush, then raise: 500, must leave nothing behind
``POST /forget?key=K``     insert and *forget to commit*: 200, must leave nothing behind
``GET /stream?n=N``        a streamed body of N chunks, reading between chunks
``POST /background?key=K`` 202; a background greenlet inserts and commits K
``GET /slow?key=K``        insert, commit after 0.5 s: a request to have in flight;
                           idempotent by its key, as ``/write``
``POST /timeout?key=K``    insert, flush, then a query cut short by ``gevent.Timeout``:
                           504, or with ``&escape=1`` the Timeout escapes the app
                           (gunicorn answers 500); never stored
``POST /orphan?key=K``     202; a greenlet inserts, flushes and ends without commit
                           or ``remove()``: greenscope reaps it; never stored
``GET /sql``                one SELECT
``GET /stats``             this worker's counters as JSON
``GET /metrics``           greenscope's Prometheus metrics, all workers (needs
                           prometheus_client; see ``gunicorn.conf.py``)
``GET /health``            200, no database
=========================  ==============================================================

Every request that uses the database first checks that its Session carries nothing from
an earlier request (pending or loaded objects, an open transaction); ``/stats`` reports
how often one did (``saw_foreign``), and such a response carries ``X-Saw-Foreign: 1``.
A request that fails because the database is unreachable (``OperationalError``, or the
deadline) answers 503.

SQLite under gevent: sqlite3 blocks the hub while it works, so a transaction that does
not wait on the network never interleaves with another greenlet's. The endpoints keep it
that way: a write transaction is flushed and committed (or rolled back) without yielding,
except ``/forget``, which only flushes on servers with real concurrency (PostgreSQL); on
SQLite its pending object is enough to expose a leaked Session.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import gevent
import gevent.local
import sqlalchemy.exc
import sqlalchemy.orm
from sqlalchemy import Engine, String, create_engine, event, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import greenscope
from greenscope import metrics
from greenscope.metrics import prometheus

MODE = os.environ.get("GREENSCOPE_DEMO_MODE", "greenscope")
DATABASE_URL = os.environ.get(
    "DATABASE_URL", f"sqlite:///{Path(__file__).resolve().parent / 'greenscope-demo.db'}"
)
TABLE = os.environ.get("GREENSCOPE_DEMO_TABLE", "demo_items")

if MODE not in {"greenscope", "stock"}:
    raise SystemExit(f"GREENSCOPE_DEMO_MODE must be 'greenscope' or 'stock', not {MODE!r}")


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = TABLE
    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))


POOL = {
    "pool_size": int(os.environ.get("GREENSCOPE_DEMO_POOL_SIZE", "20")),
    "max_overflow": int(os.environ.get("GREENSCOPE_DEMO_MAX_OVERFLOW", "80")),
    "pool_timeout": 10,
}


PGBOUNCER = bool(os.environ.get("GREENSCOPE_DEMO_PGBOUNCER"))
DEADLINE = float(os.environ.get("GREENSCOPE_DEMO_DEADLINE") or 0) or None
CONNECT_TIMEOUT = int(os.environ.get("GREENSCOPE_DEMO_CONNECT_TIMEOUT", "5"))
# Only the fleet soak lets `/write?crash=after_commit` kill a worker (see _crash).
CRASH_DIR = os.environ.get("GREENSCOPE_DEMO_CRASH_DIR", "")


def make_engine(url: str = DATABASE_URL) -> Engine:
    """The demo's engine: a pool sized for a gevent worker (see deploy/README.md)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, **POOL)

        @event.listens_for(engine, "connect")
        def _wal(dbapi_connection: Any, record: Any) -> None:
            # Readers never block the single writer; a locked write fails fast rather
            # than blocking the whole hub in sqlite3's busy loop.
            dbapi_connection.execute("PRAGMA journal_mode=WAL")
            dbapi_connection.execute("PRAGMA busy_timeout=200")

        return engine
    name = os.environ.get("GREENSCOPE_DEMO_APP_NAME", "demo").replace("{pid}", str(os.getpid()))
    connect_args: dict[str, Any] = {"application_name": name, "connect_timeout": CONNECT_TIMEOUT}
    if PGBOUNCER:
        # Transaction pooling: each transaction may run on another server connection,
        # which would not know a statement prepared on the previous one.
        connect_args["prepare_threshold"] = None
    else:
        # A query cut short on the client (gevent.Timeout, a killed greenlet) gets its
        # connection invalidated and closed, but PostgreSQL only notices a vanished
        # client when it next writes to it: until the query ends, the backend still
        # counts against max_connections. This makes it check every 250 ms (PG 14+).
        connect_args["options"] = "-c client_connection_check_interval=250"
    return create_engine(url, **POOL, connect_args=connect_args)


def create_schema(url: str = DATABASE_URL) -> None:
    """Create the demo table (run once, before the server starts)."""
    engine = make_engine(url)
    Base.metadata.create_all(engine)
    engine.dispose()


engine = make_engine()
metrics.instrument(engine, name="demo")  # the `engine` label of the pool metrics
if MODE == "greenscope":
    Session: sqlalchemy.orm.scoped_session[sqlalchemy.orm.Session] = greenscope.scoped_session(
        sessionmaker(engine)
    )
else:
    Session = sqlalchemy.orm.scoped_session(sessionmaker(engine))

if os.environ.get("GREENSCOPE_DEMO_IMPORT_QUERY"):
    # What many apps do at import: a query that warms a cache. With --preload it runs in
    # the master: one connection goes back to the pool, one Session is left open. Forked
    # workers must use neither (greenscope's worker or post_fork hook sees to that).
    Session.execute(text("SELECT 1"))
    Session.commit()
    Session.execute(text("SELECT 1"))

counters = {
    "requests": 0,
    "saw_foreign": 0,
    "deliberate_failures": 0,
    "timeouts": 0,
    "orphans": 0,
    "background_pending": 0,
    "background_failed": 0,
    "deadline_exceeded": 0,
    "database_unavailable": 0,
}

StartResponse = Callable[..., Any]


def _check_isolation() -> sqlalchemy.orm.Session:
    """The Session for this request, after noting whether it carries another's state."""
    session = Session()
    if session.new or session.dirty or len(session.identity_map) or session.in_transaction():
        counters["saw_foreign"] += 1
        _foreign.seen = True
    return session


class _Foreign(gevent.local.local):  # type: ignore[misc]  # gevent is untyped
    seen = False


_foreign = _Foreign()


def _respond(start_response: StartResponse, status: str, body: dict[str, Any]) -> Iterable[bytes]:
    data = json.dumps(body).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    if _foreign.seen:
        headers.append(("X-Saw-Foreign", "1"))
    start_response(status, headers)
    return [data]


def _background_write(key: str) -> None:
    try:
        if MODE == "greenscope":
            with greenscope.session_scope(Session, commit=True) as session:
                session.add(Item(key=key, kind="background"))
        else:  # what careful code does without greenscope
            try:
                Session.add(Item(key=key, kind="background"))
                Session.commit()
            finally:
                Session.remove()
    except Exception:
        counters["background_failed"] += 1
        raise
    finally:
        counters["background_pending"] -= 1


def _stream(n: int) -> Iterator[bytes]:
    for i in range(n):
        count = Session.scalar(select(func.count()).select_from(Item))
        yield f"{i} {count}\n".encode()
        gevent.sleep(0.005)  # pacing, so clients can hang up mid-stream


def _stats() -> dict[str, Any]:
    stats: dict[str, Any] = dict(counters)
    stats["pid"] = os.getpid()
    stats["mode"] = MODE
    stats["checkedout"] = engine.pool.checkedout()  # type: ignore[attr-defined]
    stats["greenscope"] = greenscope.stats().__dict__
    return stats


Query = dict[str, list[str]]


def _commit(
    session: sqlalchemy.orm.Session, start_response: StartResponse, key: str
) -> Iterable[bytes] | None:
    """Commit; on failure answer 503 "outcome unknown" rather than 500 "not stored".

    Flush first, so any error before the COMMIT is sent fails the request as usual
    (nothing stored). A COMMIT whose answer is lost (the connection dropped, the backend
    was terminated) may have been applied: the client is told it cannot know.
    """
    session.flush()
    try:
        session.commit()
    except sqlalchemy.exc.DBAPIError:
        return _respond(start_response, "503 Service Unavailable", {"key": key, "commit": "?"})
    return None


def _flush_or_replay(
    session: sqlalchemy.orm.Session, key: str, kind: str, start_response: StartResponse
) -> Iterable[bytes] | None:
    """Flush the new row; if its key is stored already, answer as the first time did.

    A stored key is a retry of a write that was committed (its answer lost, or a load
    balancer sent it again after the host hung up): idempotent, the same answer and
    nothing stored twice. Every endpoint that commits needs this, not only /write: a
    balancer retries whatever request a host hung up on. Another kind's key is a client
    error.
    """
    try:
        session.flush()
    except sqlalchemy.exc.IntegrityError:
        session.rollback()
        stored = session.scalar(select(Item).where(Item.key == key))
        if stored is None or stored.kind != kind:
            return _respond(start_response, "409 Conflict", {"key": key})
        return _respond(
            start_response, "201 Created", {"id": stored.id, "key": key, "replayed": True}
        )
    return None


def _write(query: Query, start_response: StartResponse) -> Iterable[bytes]:
    key = query["key"][0]
    session = _check_isolation()
    item = Item(key=key, kind="write")
    session.add(item)
    replayed = _flush_or_replay(session, key, "write", start_response)
    if replayed is not None:
        return replayed
    item_id = item.id  # read before the commit: nothing after it may fail the request
    unknown = _commit(session, start_response, key)
    if unknown is None and query.get("crash") == ["after_commit"] and CRASH_DIR:
        _crash()
    return unknown or _respond(start_response, "201 Created", {"id": item_id, "key": key})


def _crash() -> None:
    """The worker dies right after a COMMIT, before answering (an OOM kill, a segfault):
    the fleet soak's test of retries. Its soak directory learns why it never reported."""
    (Path(CRASH_DIR) / f"crashed-{os.getpid()}").touch()
    os._exit(1)


def _fail(query: Query, start_response: StartResponse) -> Iterable[bytes]:
    key = query["key"][0]
    session = _check_isolation()
    session.add(Item(key=key, kind="fail"))
    session.flush()
    counters["deliberate_failures"] += 1
    raise RuntimeError(f"deliberate failure after flushing {key}")


def _forget(query: Query, start_response: StartResponse) -> Iterable[bytes]:
    key = query["key"][0]
    session = _check_isolation()
    session.add(Item(key=key, kind="forget"))
    if engine.dialect.name != "sqlite":
        session.flush()  # a real open transaction, idle while the client waits
    with session.no_autoflush:  # a read: the Session now holds a pool connection
        count = session.scalar(select(func.count()).select_from(Item))
    return _respond(start_response, "200 OK", {"forgot": key, "count": count})


def _stream_endpoint(query: Query, start_response: StartResponse) -> Iterable[bytes]:
    _check_isolation()
    n = int(query.get("n", ["20"])[0])
    start_response("200 OK", [("Content-Type", "text/plain")])
    return _stream(n)


def _background(query: Query, start_response: StartResponse) -> Iterable[bytes]:
    key = query["key"][0]
    _check_isolation()
    counters["background_pending"] += 1
    gevent.spawn(_background_write, key)
    return _respond(start_response, "202 Accepted", {"queued": key})


def _slow(query: Query, start_response: StartResponse) -> Iterable[bytes]:
    key = query["key"][0]
    session = _check_isolation()
    session.add(Item(key=key, kind="slow"))
    if engine.dialect.name != "sqlite":  # SQLite: no write lock held across the sleep
        replayed = _flush_or_replay(session, key, "slow", start_response)
        if replayed is not None:
            return replayed
    gevent.sleep(0.5)
    if engine.dialect.name == "sqlite":
        replayed = _flush_or_replay(session, key, "slow", start_response)
        if replayed is not None:
            return replayed
    unknown = _commit(session, start_response, key)
    if unknown is not None:
        return unknown
    return _respond(start_response, "201 Created", {"key": key})


TIMEOUT_SECONDS = 0.05


def _timeout(query: Query, start_response: StartResponse) -> Iterable[bytes]:
    key = query["key"][0]
    session = _check_isolation()
    session.add(Item(key=key, kind="timeout"))
    session.flush()
    counters["timeouts"] += 1
    try:
        with gevent.Timeout(TIMEOUT_SECONDS):
            if engine.dialect.name == "postgresql":
                # Cut short mid-query: SQLAlchemy invalidates the connection (a
                # BaseException mid-statement) and closes it; the backend runs on until
                # client_connection_check_interval notices (see make_engine).
                session.execute(text("SELECT pg_sleep(2)"))
            else:
                gevent.sleep(2)
    except gevent.Timeout:
        if query.get("escape") == ["1"]:
            raise  # out of the app: gunicorn answers 500, greenscope still removes
        return _respond(start_response, "504 Gateway Timeout", {"timeout": key})
    raise AssertionError("the query outlived its timeout")  # pragma: no cover


def _orphan_write(key: str) -> None:
    # Forgets both commit and remove(): the greenlet ends holding an open transaction.
    # greenscope rolls it back and returns the connection (the "reaped" counter).
    Session.add(Item(key=key, kind="orphan"))
    Session.flush()


def _orphan(query: Query, start_response: StartResponse) -> Iterable[bytes]:
    key = query["key"][0]
    _check_isolation()
    counters["orphans"] += 1
    gevent.spawn(_orphan_write, key)
    return _respond(start_response, "202 Accepted", {"orphaned": key})


def _sql(query: Query, start_response: StartResponse) -> Iterable[bytes]:
    _check_isolation().execute(text("SELECT 1"))
    return _respond(start_response, "200 OK", {"ok": True})


ROUTES: dict[str, Callable[[Query, StartResponse], Iterable[bytes]]] = {
    "/write": _write,
    "/fail": _fail,
    "/forget": _forget,
    "/stream": _stream_endpoint,
    "/background": _background,
    "/slow": _slow,
    "/timeout": _timeout,
    "/orphan": _orphan,
    "/sql": _sql,
}


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """The WSGI entry point."""
    path = environ.get("PATH_INFO", "/")
    if path == "/health":
        return _respond(start_response, "200 OK", {"ok": True})
    if path == "/stats":
        return _respond(start_response, "200 OK", _stats())
    if path == "/metrics":
        return prometheus.metrics_app(environ, start_response)
    handler = ROUTES.get(path)
    if handler is None:
        return _respond(start_response, "404 Not Found", {"error": path})
    counters["requests"] += 1
    return _dispatch(handler, parse_qs(environ.get("QUERY_STRING", "")), start_response)


def _roll_back() -> None:
    """What an error handler does before it answers: end the failed transaction.

    greenscope removes the Session when the request ends anyway; without request-end
    removal (the stock mode) a Session left in its failed state would fail every later
    request its greenlet serves on this keep-alive connection.
    """
    with contextlib.suppress(Exception):  # a connection already gone: nothing to end
        Session.rollback()


def _dispatch(
    handler: Callable[[Query, StartResponse], Iterable[bytes]],
    query: Query,
    start_response: StartResponse,
) -> Iterable[bytes]:
    """Run one endpoint under the deadline; an unreachable database answers 503."""
    _foreign.seen = False
    deadline = gevent.Timeout(DEADLINE) if DEADLINE else None
    try:
        if deadline is not None:
            deadline.start()
        return handler(query, start_response)
    except gevent.Timeout as exc:
        if exc is not deadline:
            raise  # another timeout (the /timeout endpoint's own)
        counters["deadline_exceeded"] += 1
        _roll_back()
        return _respond(start_response, "503 Service Unavailable", {"deadline": DEADLINE})
    except sqlalchemy.exc.OperationalError:
        # The database is unreachable, or dropped the connection: fail fast and say so.
        counters["database_unavailable"] += 1
        _roll_back()
        return _respond(start_response, "503 Service Unavailable", {"database": "unavailable"})
    finally:
        if deadline is not None:
            deadline.close()
