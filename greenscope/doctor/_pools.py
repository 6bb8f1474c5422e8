"""Checks of engines and their pools: sizes, the database's limit, fork safety, the guard.

``pool-size``, ``max-connections``, ``known-engines`` and ``engine-guard``. An async
engine (``create_async_engine``) is seen through the sync ``Engine`` it wraps, and is
named "async engine" in the findings.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import URL, Engine
from sqlalchemy.pool import NullPool, QueuePool

from greenscope.doctor._framework import (
    Finding,
    Scan,
    Setup,
    Severity,
    connect_args,
    engine_label,
    engine_noun,
    plural,
    register,
)
from greenscope.doctor._workers import GEVENT_KINDS

__all__: list[str] = []  # checks are reached through the registry

# Why an async engine's sizing reads differently under a gevent worker.
_ASYNC_UNDER_GEVENT = (
    "an async engine runs on an asyncio event loop, not on the gevent worker's request "
    "greenlets, and its pooled connections belong to the loop that opened them "
    "(SQLAlchemy: with several loops, use NullPool)"
)


def _stores_on(engine: Engine) -> int:
    """greenscope.sessions stores on ``engine``; 0 when greenscope.sessions is not in use."""
    module = sys.modules.get("greenscope.sessions._store")
    return int(module.stores_on(engine)) if module is not None else 0


def _create(engine: Engine) -> str:
    return "create_async_engine" if engine.dialect.is_async else "create_engine"


@register("pool-size", tag="pools")
def _check_pool(setup: Setup, scan: Scan) -> list[Finding]:
    check = "pool-size"
    if not scan.engines:
        return [
            Finding(
                check,
                "info",
                "no Engine found: engines created later (at the first request, in a "
                "factory gunicorn does not call) are not seen",
            )
        ]
    concurrency, setting = setup.concurrency, setup.concurrency_setting
    findings = []
    for engine in scan.engines:
        label, pool = f"{engine_noun(engine)} {engine_label(engine)}", engine.pool
        # A greenscope.sessions store on this engine takes a connection of its own while
        # it works, next to the request's: each request may hold two.
        stores = _stores_on(engine)
        n = None if concurrency is None else concurrency * (1 + stores)
        if stores and concurrency is not None:
            setting = (
                f"{setup.concurrency_setting} x {1 + stores} (each request's own "
                "connection and greenscope.sessions' store's)"
            )
        else:
            setting = setup.concurrency_setting
        note = ""
        if engine.dialect.is_async and setup.kind in GEVENT_KINDS:
            note = f"; {_ASYNC_UNDER_GEVENT}"
        if type(pool) is NullPool:
            findings.append(
                Finding(
                    check,
                    "ok",
                    f"{label}: NullPool opens a connection per checkout (the "
                    "database's max_connections is the limit)",
                )
            )
            continue
        if not isinstance(pool, QueuePool):  # AsyncAdaptedQueuePool is a QueuePool
            findings.append(
                Finding(check, "info", f"{label}: {type(pool).__name__} is not checked")
            )
            continue
        size, overflow = pool.size(), pool._max_overflow
        sizes = f"pool_size {size} + max_overflow {overflow}"
        if size <= 0 or overflow < 0:
            findings.append(Finding(check, "ok", f"{label}: {sizes}: no limit{note}"))
        elif n is None:
            findings.append(
                Finding(
                    check,
                    "info",
                    f"{label}: {sizes} = {size + overflow} connections; "
                    f"{setting} unknown, not checked{note}",
                    f"give {setting} (doctor: --gunicorn-config FILE or --worker-connections N)",
                )
            )
        elif size + overflow >= n:
            findings.append(
                Finding(
                    check,
                    "ok",
                    f"{label}: {sizes} = {size + overflow} connections cover "
                    f"{setting} = {n}{note}",
                )
            )
        else:
            findings.append(
                Finding(
                    check,
                    "error",
                    f"{label}: {sizes} = {size + overflow} connections, but a worker "
                    + (
                        f"may need {n} at once ({setting}): the rest wait "
                        if stores
                        else f"serves up to {n} requests at once ({setting}): the rest wait "
                    )
                    + f"pool_timeout ({pool.timeout():g} s), then fail with 'QueuePool limit "
                    f"of size {size} overflow {overflow} reached'{note}",
                    f"`{_create(engine)}(..., pool_size=P, max_overflow=M)` with "
                    f"`P + M >= {n}`, or `{setup.concurrency_setting} = "
                    f"{(size + overflow) // (1 + stores)}`; each worker has its "
                    "own pool, so `workers x (P + M)` must fit the database's max_connections"
                    + (
                        " (for the WSGI code a gevent worker runs, `create_engine()` with a "
                        "sync driver fits: psycopg 3 is both)"
                        if note
                        else ""
                    ),
                )
            )
    return findings


# -- max-connections -------------------------------------------------------------------
#
# Every worker process has its own pools, so a server sees up to
# workers x (pool_size + max_overflow) connections from one deployment, summed over the
# engines that reach it. The thresholds, kept simple:
#
#   demand >  max_connections             error: under load, connections are refused
#   demand >= max_connections - reserved  warning: no headroom for anything else, and
#                                         roles that are not superusers get fewer
#   otherwise                             ok
#
# "reserved" is PostgreSQL's superuser_reserved_connections (+ reserved_connections
# since 16); MySQL and MariaDB reserve none within max_connections.

_CONNECT_TIMEOUT = 5  # seconds: --connect must not hang on a firewalled host

# Each driver's connect() argument for a connect timeout (dialect.driver -> name).
_TIMEOUT_ARG = {
    "psycopg": "connect_timeout",
    "psycopg2": "connect_timeout",
    "pg8000": "timeout",
    "pymysql": "connect_timeout",
    "mysqldb": "connect_timeout",
    "mariadbconnector": "connect_timeout",
    "mysqlconnector": "connection_timeout",
}

_ASK = {
    "postgresql": (
        "SELECT current_setting('max_connections'), "
        "current_setting('superuser_reserved_connections'), "
        "current_setting('reserved_connections', true)"  # PostgreSQL 16+, else NULL
    ),
    "mysql": "SELECT @@max_connections",
    "mariadb": "SELECT @@max_connections",
}

_HOW_TO_ASK = "PostgreSQL: `SHOW max_connections`, MySQL and MariaDB: `SELECT @@max_connections`"


@dataclass
class _Server:
    """The engines of this process that reach one database server."""

    url: str
    engines: list[tuple[Engine, int, str]] = field(default_factory=list)  # engine, cap, why

    @property
    def per_worker(self) -> int:
        return sum(cap for _, cap, _ in self.engines)


def _per_worker(engine: Engine, concurrency: int | None) -> tuple[int, str] | None:
    """The most connections one worker process opens with ``engine``, and why."""
    pool = engine.pool
    if isinstance(pool, QueuePool) and pool.size() > 0 and pool._max_overflow >= 0:
        size, overflow = pool.size(), pool._max_overflow
        return size + overflow, f"pool_size {size} + max_overflow {overflow}"
    unlimited = type(pool) is NullPool or isinstance(pool, QueuePool)
    if unlimited and concurrency is not None:  # a connection per request in flight, at most
        return concurrency, f"no pool limit: one per request, {concurrency} at once"
    return None  # SingletonThreadPool, StaticPool, or an unknown concurrency


def _servers(setup: Setup, scan: Scan) -> list[_Server]:
    """The network engines whose demand can be counted, grouped by server.

    Engines without a limit the doctor can count (SingletonThreadPool, StaticPool, or no
    pool limit and an unknown concurrency) are left out: pool-size reports them.
    """
    servers: dict[tuple[str, str, int | None], _Server] = {}
    for engine in scan.engines:
        url = engine.url
        if engine.dialect.name == "sqlite":
            continue  # no server: sqlite-blocking covers it
        counted = _per_worker(engine, setup.concurrency)
        if counted is None:
            continue
        key = (engine.dialect.name, url.host or "", url.port)
        # The server, not the database: max_connections counts every database's clients.
        server_url = URL.create(engine.dialect.name, host=url.host, port=url.port)
        server = servers.setdefault(key, _Server(server_url.render_as_string()))
        server.engines.append((engine, *counted))
    return list(servers.values())


def _ask(engine: Engine) -> tuple[int, int]:
    """(max_connections, connections reserved for superusers), over a new connection.

    A new DBAPI connection with the engine's URL and connect_args and a short connect
    timeout, closed at once: the engine's pool is not touched.
    """
    dialect = engine.dialect
    args, params = connect_args(engine)
    timeout_arg = _TIMEOUT_ARG.get(dialect.driver)
    if timeout_arg is not None:
        params[timeout_arg] = _CONNECT_TIMEOUT
    conn: Any = dialect.connect(*args, **params)
    try:
        cursor = conn.cursor()
        cursor.execute(_ASK[dialect.name])
        row = cursor.fetchone()
        cursor.close()
    finally:
        conn.close()
    values = [int(value) for value in row if value not in (None, "")]
    return values[0], sum(values[1:])


def _reason(exc: BaseException) -> str:
    """An exception in one line: its message's first line and its type."""
    lines = str(exc).strip().splitlines()
    return f"{lines[0]} ({type(exc).__name__})" if lines else type(exc).__name__


@register("max-connections", tag="pools")
def _check_max_connections(setup: Setup, scan: Scan) -> list[Finding]:
    """Does every worker's pool fit the database's max_connections at once?"""
    check = "max-connections"
    workers = setup.workers
    findings = []
    for server in _servers(setup, scan):
        per_worker = server.per_worker
        if len(server.engines) == 1:
            parts = server.engines[0][2]
        else:
            parts = " + ".join(
                f"{engine_noun(e)} {engine_label(e)}: {cap}" for e, cap, _ in server.engines
            )
        if workers is None:
            demand = (
                f"server {server.url}: {per_worker} connections per worker process "
                f"({parts}), workers unknown"
            )
        else:
            # Celery's prefork children are processes; gunicorn calls its own workers.
            count = (
                plural(workers, "process", "processes")
                if setup.celery is not None
                else plural(workers, "worker")
            )
            demand = (
                f"server {server.url}: {count} x {per_worker} connections ({parts}) = "
                f"{workers * per_worker}"
            )
        create = _create(server.engines[0][0])
        findings.append(_judge(check, setup, server, demand=demand, create=create))
    return findings


def _judge(check: str, setup: Setup, server: _Server, *, demand: str, create: str) -> Finding:
    """One server's finding: not asked, not reachable, or compared with its limit."""
    compare = f"compare yourself ({_HOW_TO_ASK})"
    others = "other clients of the server (more hosts, Celery workers, migrations) count too"
    if not setup.connect:
        # No fix line: nothing is known to be wrong, and a healthy report shows none.
        return Finding(
            check,
            "info",
            f"{demand}; not compared with the server's max_connections: run the doctor "
            f"with `--connect`, or ask the server ({_HOW_TO_ASK})",
        )
    askable = [e for e, _, _ in server.engines if not e.dialect.is_async]
    if not askable or askable[0].dialect.name not in _ASK:
        why = (
            "the doctor connects with sync drivers only"
            if not askable
            else f"the doctor cannot ask {askable[0].dialect.name}"
        )
        return Finding(check, "info", f"{demand}; max_connections not asked: {why}", compare)
    try:
        limit, reserved = _ask(askable[0])
    except Exception as exc:  # unreachable, refused, no such driver: say so, go on
        return Finding(
            check,
            "info",
            f"{demand}; could not ask the server for max_connections ({_reason(exc)})",
            f"check that this host reaches the database with the app's URL, or {compare}",
        )
    total = (setup.workers or 1) * server.per_worker
    usable = limit - reserved
    limits = f"max_connections {limit}" + (
        f", {reserved} of them reserved for superusers" if reserved else ""
    )
    fix = (
        f"keep `workers x (P + M)` well below {usable}: fewer workers, smaller pools "
        f"(`{create}(..., pool_size=P, max_overflow=M)`), or a larger max_connections "
        f"(or a pooler such as PgBouncer); {others}"
    )
    if total > limit:
        return Finding(
            check,
            "error",
            f"{demand}: more than the server's {limits}: with the pools full, the server "
            "refuses new connections and requests fail",
            fix,
        )
    if total >= usable:
        return Finding(
            check,
            "warning",
            f"{demand}: reaches the server's {limits}: nothing is left for other clients "
            "(migrations, psql, monitoring, a second deployment during a restart)"
            + (f", and roles that are not superusers get only {usable}" if reserved else ""),
            fix,
        )
    return Finding(check, "ok", f"{demand}: within the server's {limits}")


# -- engines greenscope knows, and the guard -------------------------------------------


@register("known-engines", tag="pools")
def _check_known_engines(setup: Setup, scan: Scan) -> list[Finding]:
    """Engines greenscope cannot see get no fresh pool in a forked worker."""
    from greenscope import _engines  # noqa: PLC0415 - the doctor's only core import here
    from greenscope._registry import registries  # noqa: PLC0415

    check = "known-engines"
    if not scan.engines:
        return []
    known = {id(e.pool) for e in _engines.known_engines()}
    unknown = [e for e in scan.engines if id(e.pool) not in known]
    if not unknown:
        return []  # the usual case: nothing worth a line
    severity: Severity = "warning" if registries() else "info"
    findings = []
    for engine in unknown:
        register_what = "engine.sync_engine" if engine.dialect.is_async else "engine"
        findings.append(
            Finding(
                check,
                severity,
                f"{engine_noun(engine)} {engine_label(engine)} is not known to greenscope: "
                "a forked worker (gunicorn --preload, Celery's prefork pool) would go on "
                "using the parent process's pooled connections",
                f"`greenscope.register_engine({register_what})` where you create it (engines "
                "bound by a greenscope scoped_session's sessionmaker, and greenscope.flask's, "
                "are known)",
            )
        )
    return findings


@register("engine-guard", tag="pools")
def _check_engine_guard(setup: Setup, scan: Scan) -> list[Finding]:
    """Is each engine's reset kept out of the hub (gevent#1937)? Do user listeners do I/O?"""
    from greenscope._guard import _Guard, guarded  # noqa: PLC0415
    from greenscope._registry import registries  # noqa: PLC0415

    check = "engine-guard"
    findings = []
    for engine in scan.engines:
        label = engine_label(engine)
        if engine.dialect.is_async:
            findings.append(
                Finding(check, "ok", f"async engine {label}: needs no guard (out of scope)")
            )
            continue
        if not guarded(engine):
            findings.append(
                Finding(
                    check,
                    "warning" if registries() else "info",
                    f"engine {label}: not guarded: a Session or Connection nobody closed, "
                    "freed by the garbage collector inside the gevent hub, fails its "
                    "rollback there (BlockingSwitchOutError, gevent#1937) and the connection "
                    "is invalidated",
                    "`greenscope.guard_engine(engine)` (automatic for engines greenscope "
                    "knows: bound by a greenscope scoped_session, greenscope.flask's, or "
                    "register_engine()'d)",
                )
            )
            continue
        own = [fn for fn in engine.pool.dispatch.reset if not isinstance(fn, _Guard)]
        own = [fn for fn in own if getattr(fn, "__module__", "").split(".")[0] != "greenscope"]
        if own:
            findings.append(
                Finding(
                    check,
                    "info",
                    f"engine {label}: guarded, with {plural(len(own), 'reset listener')} of "
                    "yours: they still run where the reset happens, inside the hub too, so "
                    "they must not do I/O",
                )
            )
        else:
            findings.append(Finding(check, "ok", f"engine {label}: guarded"))
    return findings
