"""Checks of gevent and the database drivers: does anything block the worker's hub?

``gevent-patch``, ``psycopg-import-order``, ``psycopg2-wait-callback``,
``sqlite-blocking`` and ``gc`` (reported after the pool checks, see ``CHECKS``).
"""

from __future__ import annotations

import gc
import selectors
import sys
from importlib import import_module

from sqlalchemy.engine import Engine

from greenscope.doctor._framework import (
    Finding,
    Scan,
    Setup,
    connect_args,
    engine_label,
    gevent_monkey,
    patched,
    register,
)

__all__: list[str] = []  # checks are reached through the registry

_FIX_WORKER = "run under `gunicorn -k greenscope.gunicorn.GeventWorker`"
_SQLITE_DEFAULT_TIMEOUT = 5.0  # sqlite3.connect(timeout=5.0)


@register("gevent-patch", tag="gevent")
def _check_gevent_patch(setup: Setup, scan: Scan) -> list[Finding]:
    check = "gevent-patch"
    if setup.kind == "threads":
        return [
            Finding(
                check,
                "info",
                f"{setup.worker_name} is not a gevent worker: nothing to patch; greenscope "
                "keeps one Session per thread there",
            )
        ]
    if setup.kind == "other":
        return [Finding(check, "info", f"{setup.worker_name} is not a gevent worker: not checked")]
    monkey = gevent_monkey()
    if monkey is None:
        return [
            Finding(
                check,
                "error",
                "gevent is not installed: a gevent worker cannot start",
                "`pip install 'greenscope[gunicorn]'`, then " + _FIX_WORKER,
            )
        ]
    missing = [m for m in ("threading", "socket", "select") if not monkey.is_module_patched(m)]
    if not missing:
        return [Finding(check, "ok", "gevent patched threading, socket and select")]
    harm = []
    if "threading" in missing:
        harm.append(
            "every greenlet of a thread shares threading.local values, such as "
            "SQLAlchemy's scoped_session"
        )
    if {"socket", "select"} & set(missing):
        harm.append("each database call blocks every greenlet of the worker")
    return [
        Finding(
            check,
            "error",
            f"gevent has not patched {', '.join(missing)}: {'; '.join(harm)}",
            f"{_FIX_WORKER}, or call `gevent.monkey.patch_all()` before any other import",
        )
    ]


@register("psycopg-import-order", tag="gevent")
def _check_psycopg(setup: Setup, scan: Scan) -> list[Finding]:
    check = "psycopg-import-order"
    waiting = sys.modules.get("psycopg.waiting")
    if "psycopg" not in sys.modules or waiting is None:
        return [Finding(check, "ok", "psycopg 3 is not loaded")]
    if not patched("select"):
        return [Finding(check, "ok", "psycopg 3 is loaded; select is not patched, no gevent")]
    # psycopg picks its wait functions at import (psycopg/waiting.py): wait_c unless
    # gevent already patched select, and the connect loop's DefaultSelector, bound by
    # `from selectors import DefaultSelector`. Both block the hub if picked too early.
    blocking = []
    wait = getattr(waiting, "wait", None)
    wait_c = getattr(waiting, "wait_c", None)
    if wait_c is not None and wait is wait_c:
        blocking.append("every query")
    selector = getattr(waiting, "DefaultSelector", None)
    if selector is not None and patched("selectors") and selector is not selectors.DefaultSelector:
        blocking.append("every new connection")
    if not blocking:
        name = getattr(wait, "__name__", repr(wait))
        return [
            Finding(check, "ok", f"psycopg 3 was imported after patching: it waits with {name}")
        ]
    return [
        Finding(
            check,
            "error",
            "psycopg 3 was imported before gevent patched the process, so it waits with "
            f"blocking calls: {' and '.join(blocking)} blocks every greenlet of the worker",
            "let gevent patch first: no `--preload` (`preload_app = False`), or with it "
            "create engines lazily, at first use; and nothing in gunicorn.conf.py "
            "may import psycopg, the app or a module that creates an engine "
            "(`PSYCOPG_WAIT_FUNC=wait_poll` makes queries cooperative, not connects)",
        )
    ]


@register("psycopg2-wait-callback", tag="gevent")
def _check_psycopg2(setup: Setup, scan: Scan) -> list[Finding]:
    check = "psycopg2-wait-callback"
    if "psycopg2" not in sys.modules:
        return [Finding(check, "ok", "psycopg2 is not loaded")]
    if not patched("socket"):
        return [Finding(check, "ok", "psycopg2 is loaded; socket is not patched, no gevent")]
    extensions = import_module("psycopg2.extensions")
    callback = extensions.get_wait_callback()
    if callback is None:
        return [
            Finding(
                check,
                "error",
                "psycopg2 has no wait callback: libpq waits in C, and each query blocks "
                "every greenlet of the worker until the database answers",
                "`pip install psycogreen`, and call `psycogreen.gevent.patch_psycopg()` at the "
                "top of the module that creates the engine",
            )
        ]
    name = f"{getattr(callback, '__module__', '?')}.{getattr(callback, '__qualname__', '?')}"
    return [Finding(check, "ok", f"psycopg2 waits through {name}")]


def _sqlite_timeout(engine: Engine) -> float | None:
    """The busy timeout sqlite3.connect() gets, from the URL and connect_args if visible."""
    timeout = connect_args(engine)[1].get("timeout", _SQLITE_DEFAULT_TIMEOUT)
    try:
        return float(timeout)
    except (TypeError, ValueError):
        return None


def _is_memory(engine: Engine) -> bool:
    database = engine.url.database
    mode = engine.url.query.get("mode")
    return (
        database in (None, "", ":memory:") or mode == "memory" or "mode=memory" in (database or "")
    )


# What an in-memory SQLite database does under gevent, by pool class (measured for the
# first: after patching, SingletonThreadPool's threading.local is per greenlet).
_MEMORY_POOLS = {
    "SingletonThreadPool": (
        "under gevent SingletonThreadPool gives every greenlet its own connection: each "
        "request sees its own empty database"
    ),
    "StaticPool": "StaticPool shares it, and its transaction, among all greenlets",
}
_MEMORY_OTHER = "each connection of the pool is a separate, empty database"


@register("sqlite-blocking", tag="gevent")
def _check_sqlite(setup: Setup, scan: Scan) -> list[Finding]:
    check = "sqlite-blocking"
    engines = [e for e in scan.engines if e.dialect.name == "sqlite"]
    if not engines:
        return [Finding(check, "ok", "no SQLite engine")]
    if setup.kind in {"threads", "other"} or not patched("threading"):
        return [
            Finding(check, "ok", f"SQLite engine {engine_label(e)}: fine without gevent")
            for e in engines
        ]
    findings = []
    for engine in engines:
        label = engine_label(engine)
        if _is_memory(engine):
            findings.append(
                Finding(
                    check,
                    "error",
                    f"engine {label}: an in-memory database lives in one connection, and "
                    + _MEMORY_POOLS.get(type(engine.pool).__name__, _MEMORY_OTHER),
                    "use a file database (sqlite:///app.db) for development and a network "
                    "database in production",
                )
            )
            continue
        timeout = _sqlite_timeout(engine)
        shown = "unknown" if timeout is None else f"{timeout:g} s"
        blocks = (
            f"engine {label}: sqlite3 runs in the worker's only thread, so each statement "
            "blocks every greenlet of the worker, and a writer waiting for a lock blocks "
            f"them all for up to the busy timeout ({shown}), then fails with "
            "'database is locked'"
        )
        if timeout is not None and setup.worker_timeout and timeout >= setup.worker_timeout:
            findings.append(
                Finding(
                    check,
                    "error",
                    f"{blocks}; that is at least gunicorn's timeout "
                    f"({setup.worker_timeout:g} s): a worker waiting for a lock sends no "
                    "heartbeat, and the master kills it (WORKER TIMEOUT)",
                    "keep sqlite3's busy timeout (`connect_args={'timeout': ...}`, 5 s by "
                    "default) well below gunicorn's timeout, and use a network database in "
                    "production",
                )
            )
        else:
            findings.append(
                Finding(
                    check,
                    "warning",
                    blocks,
                    "fine for development; in production use a network database "
                    "(PostgreSQL with psycopg 3, MySQL with PyMySQL)",
                )
            )
    return findings


_DEFAULT_GC = {(700, 10, 10), (2000, 10, 10), (2000, 10, 0)}


@register("gc", tag="gevent")
def _check_gc(setup: Setup, scan: Scan) -> list[Finding]:
    """The GC thresholds: when automatic collections (and the resets they cause) run."""
    enabled = gc.isenabled()
    thresholds = gc.get_threshold()
    # Python's own defaults differ by version (700 before 3.13, 2000 since).
    which = "Python's default" if thresholds in _DEFAULT_GC else str(thresholds)
    state = f"automatic GC {'on' if enabled else 'off'}, thresholds {which}"
    return [
        Finding(
            "gc",
            "info",
            f"{state}: a collection may run inside the gevent hub and free what nobody "
            "closed there; the engine guard covers connections. To make collections rarer "
            "or move them to safe points (gevent#2005): raise the thresholds "
            "(gc.set_threshold), or gc.disable() and gc.collect() between requests, or "
            "gc.freeze() after start-up",
        )
    ]
