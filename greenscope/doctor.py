"""Deployment checks: what in this process will hurt a gevent + SQLAlchemy service.

Each check looks at the *current process*: what gevent patched, which database drivers
are loaded and how they wait, every SQLAlchemy ``Engine`` and ``scoped_session`` alive
(found with one :func:`gc.get_objects` pass, so Flask-SQLAlchemy's and the app's own
are seen alike), and what the gunicorn worker does at request end. Each finding has a
stable check id:

==========================  ===========================================================
``gevent-patch``            gevent patched threading, socket and select
``psycopg-import-order``    psycopg 3 was imported after patching (else it blocks)
``psycopg2-wait-callback``  psycopg2 has a gevent wait callback (psycogreen)
``sqlite-blocking``         SQLite engines: they block the worker while they work
``pool-size``               ``pool_size + max_overflow`` covers a worker's concurrency
``stock-scoped-session``    SQLAlchemy scoped_sessions shared by every greenlet
``request-end-removal``     something removes each request's Sessions when it ends
==========================  ===========================================================

Three ways in:

* ``python -m greenscope doctor --app module:app [--gunicorn-config FILE]`` (see
  :mod:`greenscope.__main__`): imports the app the way a gunicorn worker would, then
  reports. Exit status 1 on an ``error`` (with ``--strict`` also on a ``warning``).
* :func:`greenscope.gunicorn.post_worker_init`, a gunicorn hook, and greenscope's worker
  classes, which run the checks once at worker start and log warnings and errors
  (``GREENSCOPE_DOCTOR=0`` turns that off).
* :func:`diagnose`, for your own health checks and tests.

Not guaranteed: engines and registries created after the checks ran (lazily, at the
first request) are not seen; a ``post_request`` hook of your own is only inspected for a
reference to greenscope's, not run.

.. versionadded:: 0.1
"""

from __future__ import annotations

import gc
import json
import re
import selectors
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import import_module
from pkgutil import resolve_name
from types import ModuleType
from typing import Any, Literal

from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool, QueuePool
from sqlalchemy.util import ScopedRegistry, ThreadLocalRegistry

import greenscope

__all__ = [
    "CHECKS",
    "Finding",
    "Severity",
    "diagnose",
    "exit_status",
    "report",
    "summary",
    "to_json",
]

Severity = Literal["ok", "info", "warning", "error"]

CHECKS = (
    "gevent-patch",
    "psycopg-import-order",
    "psycopg2-wait-callback",
    "sqlite-blocking",
    "pool-size",
    "known-engines",
    "engine-guard",
    "gc",
    "stock-scoped-session",
    "request-end-removal",
    "celery-install",
    "celery-soft-time-limit",
)
"""Every check id, in report order."""

# How each worker kind behaves; see _worker_kind.
_WorkerKind = Literal["greenscope", "gevent", "gevent-pywsgi", "threads", "other"]
_GEVENT_KINDS = frozenset({"greenscope", "gevent", "gevent-pywsgi"})

# gunicorn's short names (gunicorn.workers.SUPPORTED_WORKERS), without importing them.
_ALIASES: dict[str, _WorkerKind] = {
    "sync": "threads",
    "gthread": "threads",
    "gevent": "gevent",
    "gevent_wsgi": "gevent-pywsgi",
    "gevent_pywsgi": "gevent-pywsgi",
    "eventlet": "other",
    "tornado": "other",
    "asgi": "other",
}

_FIX_WORKER = "run under `gunicorn -k greenscope.gunicorn.GeventWorker`"
_SQLITE_DEFAULT_TIMEOUT = 5.0  # sqlite3.connect(timeout=5.0)
_WRAP = 100


@dataclass(frozen=True)
class Finding:
    """One result of one check: what was found and, unless ``ok``, what to do.

    ``check`` is one of :data:`CHECKS`. ``severity``: ``ok`` (checked, fine), ``info``
    (worth knowing, or not checkable), ``warning`` (fine for development, review it
    before production), ``error`` (will hurt in production).
    """

    check: str
    severity: Severity
    message: str
    fix: str = ""


@dataclass(frozen=True)
class _Setup:
    """What diagnose() was told about the deployment."""

    kind: _WorkerKind | None
    worker_name: str | None
    concurrency: int | None
    concurrency_setting: str
    worker_timeout: float | None
    post_request: Callable[..., object] | None
    app: object
    assumed: bool = False
    celery: Any = None  # the Celery app, when checking a Celery worker
    pool: str | None = None  # its pool: gevent, prefork, threads, solo


@dataclass
class _Scan:
    """What one gc pass found."""

    engines: list[Engine] = field(default_factory=list)
    stock_registries: list[ScopedRegistry[Any]] = field(default_factory=list)


# -- the process -----------------------------------------------------------------------


def _gevent_monkey() -> ModuleType | None:
    """gevent.monkey, or None without gevent (importing it patches nothing)."""
    try:
        return import_module("gevent.monkey")
    except ImportError:
        return None


def _patched(module: str) -> bool:
    monkey = _gevent_monkey()
    return monkey is not None and bool(monkey.is_module_patched(module))


def _scan() -> _Scan:
    """Engines and non-greenscope registries alive in the process, in one gc pass.

    Classified by ``type()``, never ``isinstance()``: that would ask each object for
    ``__class__``, which proxies (werkzeug's LocalProxy) answer by running code.
    """
    found = _Scan()
    kinds: dict[type, str] = {}
    seen_pools: set[int] = set()
    for obj in gc.get_objects():
        cls = type(obj)
        kind = kinds.get(cls)
        if kind is None:
            kind = kinds[cls] = _classify(cls)
        if kind == "engine":
            pool = getattr(obj, "pool", None)
            if id(pool) not in seen_pools:  # engine.execution_options() copies share a pool
                seen_pools.add(id(pool))
                found.engines.append(obj)
        elif kind == "registry":
            found.stock_registries.append(obj)
    found.engines.sort(key=_engine_label)
    return found


def _classify(cls: type) -> str:
    """``engine``, ``registry`` (a registry that is not greenscope's) or ``""``."""
    try:
        if issubclass(cls, Engine):
            return "engine"
        if issubclass(cls, ScopedRegistry) and not cls.__module__.startswith("greenscope"):
            return "registry"
    except TypeError:  # pragma: no cover - a class whose __subclasscheck__ fails
        pass
    return ""


def _engine_label(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


# -- the worker ------------------------------------------------------------------------


def _worker_kind(worker_class: str | type | None) -> _WorkerKind | None:
    """What a gunicorn worker class does, from its short name, dotted path or class."""
    if isinstance(worker_class, str):
        name = worker_class.removeprefix("egg:gunicorn#")
        if name in _ALIASES:
            return _ALIASES[name]
        try:
            worker_class = resolve_name(name)
        except (ImportError, AttributeError, ValueError):
            return "other"
    if worker_class is None:
        return None
    return _class_kind(worker_class) if isinstance(worker_class, type) else "other"


def _class_kind(cls: type) -> _WorkerKind:
    """A worker class's kind: by its base classes and, for gevent, its server class."""
    mro_modules = {base.__module__ for base in cls.__mro__}
    if mro_modules & {"gunicorn.workers.sync", "gunicorn.workers.gthread"}:
        return "threads"
    if "gunicorn.workers.ggevent" not in mro_modules:
        return "other"
    server_class = getattr(cls, "server_class", None)
    if "greenscope.gunicorn" not in mro_modules:
        return "gevent" if server_class is None else "gevent-pywsgi"
    from greenscope import gunicorn as ours  # noqa: PLC0415 - gunicorn is loaded

    handler = getattr(cls, "wsgi_handler", None)
    if server_class is None or (
        isinstance(handler, type) and issubclass(handler, ours._PyWSGIHandler)
    ):
        return "greenscope"
    return "gevent-pywsgi"  # a subclass of ours that swapped the pywsgi handler


def _worker_name(worker_class: str | type | None) -> str | None:
    if worker_class is None or isinstance(worker_class, str):
        return worker_class
    return f"{worker_class.__module__}.{worker_class.__qualname__}"


def _is_gunicorn_default(hook: Callable[..., object]) -> bool:
    return getattr(hook, "__module__", None) == "gunicorn.config"


def _calls_greenscope(hook: Callable[..., object]) -> bool:
    """Whether a post_request hook is, or refers by name to, greenscope's removal.

    Looks at the names the function's code uses and what they are in its globals:
    ``greenscope_hooks.post_request(...)`` and ``remove_current()`` are seen, a call
    through another function is not.
    """
    from greenscope import gunicorn as ours  # noqa: PLC0415 - only with a gunicorn hook

    targets = (ours.post_request, greenscope.remove_current)
    if any(hook is target for target in targets):
        return True
    code = getattr(hook, "__code__", None)
    namespace = getattr(hook, "__globals__", None)
    if code is None or not isinstance(namespace, dict):
        return False
    names = set(code.co_names)
    uses_attribute = bool(names & {"post_request", "remove_current"})
    for name in names:
        value = namespace.get(name)  # compared by identity: globals may define __eq__
        if any(value is target for target in targets):
            return True
        if uses_attribute and (value is ours or value is greenscope):
            return True
    return False


def _wsgi_chain(app: object) -> list[object]:
    """The app and what it wraps: middleware keep the next app in ``.app``,
    ``.application`` or (Flask) ``.wsgi_app``. Bounded, cycle-safe, never raises."""
    chain: list[object] = []
    todo = [app]
    while todo and len(chain) < 16:
        obj = todo.pop(0)
        if obj is None or any(obj is seen for seen in chain):
            continue
        chain.append(obj)
        for attr in ("wsgi_app", "app", "application"):
            try:
                todo.append(getattr(obj, attr, None))
            except Exception:  # a property that raises: not a wrapper
                continue
    return chain


def _flask_apps(app: object) -> list[Any]:
    return [a for a in _wsgi_chain(app) if hasattr(a, "teardown_appcontext_funcs")]


def _teardown_funcs(app: object) -> list[Callable[..., object]]:
    """Flask's teardown_appcontext and teardown_request functions (every blueprint's)."""
    funcs: list[Callable[..., object]] = []
    for flask_app in _flask_apps(app):
        funcs += list(getattr(flask_app, "teardown_appcontext_funcs", None) or [])
        per_blueprint = getattr(flask_app, "teardown_request_funcs", None) or {}
        if isinstance(per_blueprint, dict):
            for blueprint_funcs in per_blueprint.values():
                funcs += list(blueprint_funcs)
    return funcs


def _calls_remove(func: object) -> bool:
    """Whether ``func``'s code uses the name ``remove`` (``Session.remove()``)."""
    return "remove" in getattr(getattr(func, "__code__", None), "co_names", ())


def _app_removes(app: object) -> str | None:
    """How the app removes Sessions at request end by itself, if it visibly does."""
    from greenscope.wsgi import GreenscopeMiddleware  # noqa: PLC0415 - import cycle

    if any(type(a) is GreenscopeMiddleware for a in _wsgi_chain(app)):
        return "the app is wrapped in greenscope.wsgi.GreenscopeMiddleware"
    for func in _teardown_funcs(app):
        module = getattr(func, "__module__", "") or ""
        if module.startswith(("greenscope", "flask_sqlalchemy")) or _calls_remove(func):
            return "Flask removes the Session in a teardown function"
    return None


# -- the checks ------------------------------------------------------------------------


def _check_gevent_patch(setup: _Setup, scan: _Scan) -> list[Finding]:
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
    monkey = _gevent_monkey()
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


def _check_psycopg(setup: _Setup, scan: _Scan) -> list[Finding]:
    check = "psycopg-import-order"
    waiting = sys.modules.get("psycopg.waiting")
    if "psycopg" not in sys.modules or waiting is None:
        return [Finding(check, "ok", "psycopg 3 is not loaded")]
    if not _patched("select"):
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
    if (
        selector is not None
        and _patched("selectors")
        and selector is not selectors.DefaultSelector
    ):
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


def _check_psycopg2(setup: _Setup, scan: _Scan) -> list[Finding]:
    check = "psycopg2-wait-callback"
    if "psycopg2" not in sys.modules:
        return [Finding(check, "ok", "psycopg2 is not loaded")]
    if not _patched("socket"):
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
    params: Mapping[str, Any] = engine.dialect.create_connect_args(engine.url)[1]
    # create_engine keeps the merged URL query + connect_args in its connect closure.
    creator = getattr(engine.pool, "_creator", None)
    code = getattr(creator, "__code__", None)
    closure = getattr(creator, "__closure__", None)
    if code is not None and closure and "cparams" in code.co_freevars:
        cell = closure[code.co_freevars.index("cparams")]
        if isinstance(cell.cell_contents, Mapping):
            params = cell.cell_contents
    timeout = params.get("timeout", _SQLITE_DEFAULT_TIMEOUT)
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


def _check_sqlite(setup: _Setup, scan: _Scan) -> list[Finding]:
    check = "sqlite-blocking"
    engines = [e for e in scan.engines if e.dialect.name == "sqlite"]
    if not engines:
        return [Finding(check, "ok", "no SQLite engine")]
    if setup.kind in {"threads", "other"} or not _patched("threading"):
        return [
            Finding(check, "ok", f"SQLite engine {_engine_label(e)}: fine without gevent")
            for e in engines
        ]
    findings = []
    for engine in engines:
        label = _engine_label(engine)
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


def _check_pool(setup: _Setup, scan: _Scan) -> list[Finding]:
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
    n, setting = setup.concurrency, setup.concurrency_setting
    findings = []
    for engine in scan.engines:
        label, pool = _engine_label(engine), engine.pool
        if type(pool) is NullPool:
            findings.append(
                Finding(
                    check,
                    "ok",
                    f"engine {label}: NullPool opens a connection per checkout (the "
                    "database's max_connections is the limit)",
                )
            )
            continue
        if not isinstance(pool, QueuePool):
            findings.append(
                Finding(check, "info", f"engine {label}: {type(pool).__name__} is not checked")
            )
            continue
        size, overflow = pool.size(), pool._max_overflow
        sizes = f"pool_size {size} + max_overflow {overflow}"
        if size <= 0 or overflow < 0:
            findings.append(Finding(check, "ok", f"engine {label}: {sizes}: no limit"))
        elif n is None:
            findings.append(
                Finding(
                    check,
                    "info",
                    f"engine {label}: {sizes} = {size + overflow} connections; "
                    f"{setting} unknown, not checked",
                    f"give {setting} (doctor: --gunicorn-config FILE or --worker-connections N)",
                )
            )
        elif size + overflow >= n:
            findings.append(
                Finding(
                    check,
                    "ok",
                    f"engine {label}: {sizes} = {size + overflow} connections cover "
                    f"{setting} = {n}",
                )
            )
        else:
            findings.append(
                Finding(
                    check,
                    "error",
                    f"engine {label}: {sizes} = {size + overflow} connections, but a worker "
                    f"serves up to {n} requests at once ({setting}): the rest wait "
                    f"pool_timeout ({pool.timeout():g} s), then fail with 'QueuePool limit "
                    f"of size {size} overflow {overflow} reached'",
                    f"`create_engine(..., pool_size=P, max_overflow=M)` with `P + M >= {n}`, or "
                    f"`{setting} = {size + overflow}`; each worker has its own pool, so "
                    "`workers x (P + M)` must fit the database's max_connections",
                )
            )
    return findings


def _check_known_engines(setup: _Setup, scan: _Scan) -> list[Finding]:
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
    return [
        Finding(
            check,
            severity,
            f"engine {_engine_label(engine)} is not known to greenscope: a forked worker "
            "(gunicorn --preload, Celery's prefork pool) would go on using the parent "
            "process's pooled connections",
            "`greenscope.register_engine(engine)` where you create it (engines bound by a "
            "greenscope scoped_session's sessionmaker, and greenscope.flask's, are known)",
        )
        for engine in unknown
    ]


def _check_engine_guard(setup: _Setup, scan: _Scan) -> list[Finding]:
    """Is each engine's reset kept out of the hub (gevent#1937)? Do user listeners do I/O?"""
    from greenscope._guard import _Guard, guarded  # noqa: PLC0415
    from greenscope._registry import registries  # noqa: PLC0415

    check = "engine-guard"
    findings = []
    for engine in scan.engines:
        label = _engine_label(engine)
        if engine.dialect.is_async:
            findings.append(
                Finding(check, "ok", f"engine {label}: async, needs no guard (out of scope)")
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
                    f"engine {label}: guarded, with {_plural(len(own), 'reset listener')} of "
                    "yours: they still run where the reset happens, inside the hub too, so "
                    "they must not do I/O",
                )
            )
        else:
            findings.append(Finding(check, "ok", f"engine {label}: guarded"))
    return findings


_DEFAULT_GC = {(700, 10, 10), (2000, 10, 10), (2000, 10, 0)}


def _check_gc(setup: _Setup, scan: _Scan) -> list[Finding]:
    """The GC thresholds: when automatic collections (and the resets they cause) run."""
    import gc as _gc  # noqa: PLC0415

    enabled = _gc.isenabled()
    thresholds = _gc.get_threshold()
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


def _check_registries(setup: _Setup, scan: _Scan) -> list[Finding]:
    check = "stock-scoped-session"
    findings = []
    monkey = _gevent_monkey()
    shared: list[ScopedRegistry[Any]] = []
    unscoped: list[ScopedRegistry[Any]] = []
    if monkey is not None and monkey.is_module_patched("threading"):
        real_local = monkey.get_original("_thread", "_local")
        for registry in scan.stock_registries:
            if type(registry) is ThreadLocalRegistry and type(registry.registry) is real_local:
                shared.append(registry)
            else:
                unscoped.append(registry)
    if shared:
        findings.append(
            Finding(
                check,
                "error",
                f"{_plural(len(shared), 'SQLAlchemy scoped_session')} built before gevent "
                "patched threading: every greenlet of the worker shares ONE Session, its "
                "objects and its transaction",
                "use greenscope's drop-in: `from greenscope import scoped_session`",
            )
        )
    if unscoped and setup.kind in _GEVENT_KINDS and not _removes_stock(setup):
        stock = f"{_plural(len(unscoped), 'SQLAlchemy scoped_session')} (not greenscope's)"
        why = (
            "greenscope's request-end removal skips SQLAlchemy's registries, and a gevent "
            "worker serves every keep-alive request of a connection in one greenlet"
        )
        fix = (
            "use greenscope's drop-in, `from greenscope import scoped_session`, or call "
            "`Session.remove()` at the end of every request (Flask: in a teardown function)"
        )
        if _flask_apps(setup.app):  # Flask's teardowns are all there is to look at
            message = f"{stock}, and no Flask teardown function calls remove(): {why}, so "
            findings.append(Finding(check, "error", message + _REUSED, fix))
        else:
            message = (
                f"{stock}: {why}; the doctor cannot see whether your app calls its "
                f"remove() when each request ends, and if not, {_REUSED}"
            )
            findings.append(Finding(check, "warning", message, fix))
    elif unscoped:
        findings.append(
            Finding(
                check,
                "info",
                f"{_plural(len(unscoped), 'SQLAlchemy scoped_session')} (not greenscope's): "
                "a Session whose greenlet ends without remove() keeps its connection until "
                "garbage collection, and greenscope's request-end removal skips it",
                "use greenscope.scoped_session, or remove() at the end of every request",
            )
        )
    ours = len(greenscope.registries())
    if ours:
        findings.append(
            Finding(
                check, "ok", f"{_plural(ours, 'greenscope registry', 'greenscope registries')}"
            )
        )
    elif not scan.stock_registries:
        findings.append(Finding(check, "info", "no scoped_session found"))
    elif not findings:
        findings.append(
            Finding(
                check, "ok", "SQLAlchemy scoped_session without gevent: one Session per thread"
            )
        )
    return findings


_REUSED = (
    "the next keep-alive request of a connection gets the previous one's Session and "
    "open transaction"
)
_NOTHING_REMOVES = f"nothing removes Sessions at request end, so {_REUSED}"


def _removes_stock(setup: _Setup) -> bool:
    """Whether a Flask teardown or a post_request hook of the app's visibly calls remove().

    greenscope's worker, hooks and middleware remove greenscope's registries only; a
    SQLAlchemy scoped_session needs the app's own ``remove()``. Seen by name in the
    function's code, as ``Session.remove()`` (and Flask-SQLAlchemy's teardown) has it.
    """
    funcs = _teardown_funcs(setup.app)
    hook = setup.post_request
    if hook is not None and not _is_gunicorn_default(hook):
        funcs.append(hook)
    return any(_calls_remove(f) for f in funcs)


def _check_celery_install(setup: _Setup, scan: _Scan) -> list[Finding]:
    """Celery: does greenscope.celery remove each task's Sessions?"""
    if setup.celery is None:
        return []
    from greenscope._registry import registries  # noqa: PLC0415

    check = "celery-install"
    try:
        from greenscope.celery import installed  # noqa: PLC0415
    except ImportError:
        return [Finding(check, "info", "Celery is not importable: not checked")]
    if installed(setup.celery):
        return [Finding(check, "ok", "greenscope.celery.install(app) ran: tasks are removed")]
    long_lived = setup.pool in {"prefork", "threads", "solo"}
    if not registries():
        return [Finding(check, "info", "no greenscope registry: nothing to remove per task")]
    return [
        Finding(
            check,
            "error" if long_lived else "warning",
            f"greenscope.celery.install(app) did not run: with the {setup.pool} pool "
            + (
                "every task runs on one long-lived greenlet, so the next task inherits "
                "the previous one's Session and open transaction"
                if long_lived
                else "each task's Session is left to orphan cleanup (a WARNING per task, "
                "and the connection comes back only after the task's greenlet ended)"
            ),
            "`greenscope.celery.install(app)` where the Celery app is created",
        )
    ]


def _check_celery_soft_time_limit(setup: _Setup, scan: _Scan) -> list[Finding]:
    """The gevent pool ignores soft_time_limit: say so where one is set."""
    if setup.celery is None or setup.pool != "gevent":
        return []
    check = "celery-soft-time-limit"
    conf = setup.celery.conf
    limited = ["task_soft_time_limit"] if conf.get("task_soft_time_limit") else []
    tasks = getattr(setup.celery, "tasks", {})
    limited += sorted(name for name, t in tasks.items() if getattr(t, "soft_time_limit", None))
    if not limited:
        return [Finding(check, "ok", "no soft_time_limit set")]
    return [
        Finding(
            check,
            "warning",
            f"soft_time_limit set ({', '.join(limited[:5])}), but the gevent pool ignores "
            "it: no SoftTimeLimitExceeded is raised, the task runs on",
            "bound waits with `gevent.Timeout(seconds)` inside the task, or use the hard "
            "`time_limit` (the gevent pool enforces it, and greenscope still removes the "
            "task's Session)",
        )
    ]


def _check_request_end(setup: _Setup, scan: _Scan) -> list[Finding]:
    """Who removes each request's Sessions: greenscope's worker, a hook, or the app."""
    if setup.celery is not None:
        return []  # a Celery worker: see celery-install
    check, kind, name, hook = (
        "request-end-removal",
        setup.kind,
        setup.worker_name,
        setup.post_request,
    )
    own_hook = (
        kind in {"gevent", "threads"} and hook is not None and not _is_gunicorn_default(hook)
    )
    by_app = _app_removes(setup.app) if kind not in {None, "greenscope"} else None
    if kind is None:
        finding = Finding(check, "info", "worker class unknown: not checked")
    elif setup.assumed:
        finding = Finding(
            check,
            "info",
            f"worker class assumed ({name}): not checked",
            "pass the worker class (`-k`) or the gunicorn config (`-c`) to check it",
        )
    elif not greenscope.registries():
        finding = Finding(
            check,
            "info",
            "no greenscope registry: nothing for greenscope to remove (SQLAlchemy "
            "scoped_sessions are checked under stock-scoped-session)",
        )
    elif kind == "greenscope":
        finding = Finding(check, "ok", f"{name} removes each request's Sessions when it ends")
    elif kind == "other":
        finding = Finding(check, "info", f"{name} is not a gevent or thread worker: not checked")
    elif own_hook and hook is not None and _calls_greenscope(hook):
        finding = Finding(check, "ok", f"{name} with greenscope's post_request hook")
    elif own_hook:
        finding = Finding(
            check,
            "info",
            f"{name} with a post_request hook of your own ({getattr(hook, '__qualname__', hook)})",
            "make sure it calls `greenscope.gunicorn.post_request(worker, req, environ, resp)`",
        )
    elif by_app:
        finding = Finding(check, "ok", f"{name}: {by_app}")
    elif kind == "threads":
        finding = Finding(
            check,
            "warning",
            f"{name} is not a gevent worker: greenscope keeps one Session per thread, and "
            "nothing removes it at request end, so the thread's next request gets the "
            "previous one's Session and open transaction",
            "`from greenscope.gunicorn import post_request` in gunicorn.conf.py",
        )
    elif kind == "gevent-pywsgi":
        finding = Finding(
            check,
            "error",
            f"{name} calls no post_request hook: {_NOTHING_REMOVES}",
            "`-k greenscope.gunicorn.GeventPyWSGIWorker`, or wrap the app in "
            "greenscope.wsgi.GreenscopeMiddleware",
        )
    else:
        finding = Finding(
            check,
            "error",
            f"{name} without a post_request hook: {_NOTHING_REMOVES}",
            "`-k greenscope.gunicorn.GeventWorker`, or greenscope's hooks in gunicorn.conf.py: "
            "`from greenscope.gunicorn import post_request` (and post_fork, worker_exit)",
        )
    return [finding]


_CHECK_FUNCS: tuple[tuple[str, Callable[[_Setup, _Scan], list[Finding]]], ...] = (
    ("gevent-patch", _check_gevent_patch),
    ("psycopg-import-order", _check_psycopg),
    ("psycopg2-wait-callback", _check_psycopg2),
    ("sqlite-blocking", _check_sqlite),
    ("pool-size", _check_pool),
    ("known-engines", _check_known_engines),
    ("engine-guard", _check_engine_guard),
    ("gc", _check_gc),
    ("stock-scoped-session", _check_registries),
    ("request-end-removal", _check_request_end),
    ("celery-install", _check_celery_install),
    ("celery-soft-time-limit", _check_celery_soft_time_limit),
)


def diagnose(
    *,
    worker_connections: int | None = None,
    threads: int | None = None,
    worker_class: str | type | None = None,
    worker_timeout: float | None = None,
    post_request: Callable[..., object] | None = None,
    app: object = None,
    worker_class_assumed: bool = False,
    celery_app: object = None,
    celery_pool: str | None = None,
) -> list[Finding]:
    """Inspect the current process; return the findings of every check, in report order.

    Everything is optional; what is not given is not checked (an ``info`` finding says
    so). ``worker_class`` is gunicorn's setting (``"gevent"``, a dotted path) or the
    class; without it the process is expected to run gevent. The requests a worker
    serves at once are ``worker_connections`` for a gevent worker, ``threads`` for
    gthread, 1 for sync. ``worker_timeout`` is gunicorn's ``timeout``; ``post_request``
    the hook gunicorn will call (``cfg.post_request``); ``app`` the WSGI app, to see
    whether it removes Sessions itself. ``worker_class_assumed``: the worker class is a
    guess, so request-end removal is not judged. ``celery_app`` and ``celery_pool``
    (``gevent``, ``prefork``, ``threads``, ``solo``) check a Celery worker instead of a
    gunicorn one: ``worker_connections`` (gevent) or ``threads`` (threads) carry its
    concurrency. A check that fails is reported as a ``warning`` naming the exception,
    never raised.

    .. versionadded:: 0.1
    """
    if celery_app is not None:
        worker_class = {"gevent": "gevent", "threads": "gthread"}.get(celery_pool or "", "sync")
    kind = _worker_kind(worker_class)
    if kind == "threads":
        sync = _worker_name(worker_class) in {"sync", "gunicorn.workers.sync.SyncWorker"}
        concurrency, setting = (1 if sync else threads), "threads"
    else:
        concurrency, setting = worker_connections, "worker_connections"
    if celery_app is not None:
        setting = "worker_concurrency (-c)" if celery_pool in {"gevent", "threads"} else setting
    setup = _Setup(
        kind=kind,
        worker_name=_worker_name(worker_class),
        concurrency=concurrency,
        concurrency_setting=setting,
        worker_timeout=worker_timeout,
        post_request=post_request,
        app=app,
        assumed=worker_class_assumed,
        celery=celery_app,
        pool=celery_pool,
    )
    scan = _scan()
    findings: list[Finding] = []
    for check, func in _CHECK_FUNCS:
        try:
            findings.extend(func(setup, scan))
        except Exception as exc:  # a check must never take the worker or the report down
            findings.append(
                Finding(check, "warning", f"the check failed: {exc!r}", "please report it")
            )
    return findings


# -- output ----------------------------------------------------------------------------

_LABEL: dict[str, str] = {"ok": "ok", "info": "info", "warning": "WARN", "error": "ERROR"}


def exit_status(findings: Iterable[Finding], *, strict: bool = False) -> int:
    """1 if a finding is an ``error`` (with ``strict``, also a ``warning``), else 0."""
    failing = {"error", "warning"} if strict else {"error"}
    return 1 if any(f.severity in failing for f in findings) else 0


def summary(findings: Sequence[Finding], *, strict: bool = False) -> str:
    """The last line of :func:`report`: counts and what they mean."""
    errors = sum(f.severity == "error" for f in findings)
    warnings = sum(f.severity == "warning" for f in findings)
    counts = ", ".join(
        part
        for part in (
            _plural(errors, "error") if errors else "",
            _plural(warnings, "warning") if warnings else "",
        )
        if part
    )
    if errors:
        return f"{counts}: this setup will fail in production"
    if warnings and strict:
        return f"{counts}: failing (--strict)"
    if warnings:
        return f"{counts}: review before production"
    return "no problems found"


def report(
    findings: Sequence[Finding],
    *,
    inspected: Mapping[str, str] | None = None,
    strict: bool = False,
) -> str:
    """The findings for a person: a header, one aligned line per finding, a summary.

    ``inspected`` is shown in the header (``{"app": "demo_app:app", ...}``). Lines wrap
    at 100 columns, never inside a `code span` or between a number and its unit.
    """
    lines = ["greenscope doctor"]
    width = max([len(k) for k in inspected or {}] or [0])
    for key, value in (inspected or {}).items():
        lines.append(f"  {key:<{width}}  {value}")
    lines.append("")
    id_width = max([len(f.check) for f in findings] or [0])
    indent = " " * (5 + 2 + id_width + 2)
    for f in findings:
        lines += _wrap(f.message, f"{_LABEL[f.severity]:<5}  {f.check:<{id_width}}  ", indent)
        if f.fix and f.severity != "ok":
            lines += _wrap(f"fix: {f.fix}", indent, indent + "     ")
    lines.extend(["", summary(findings, strict=strict)])
    return "\n".join(lines) + "\n"


_NBSP = "\u00a0"  # textwrap never breaks at it


def _wrap(text: str, first: str, rest: str) -> list[str]:
    glued = re.sub(r"`[^`]*`", lambda m: m.group().replace(" ", _NBSP), text)
    glued = re.sub(r"(\d) (s|ms)\b", rf"\1{_NBSP}\2", glued)
    wrapped = textwrap.wrap(
        glued,
        _WRAP,
        initial_indent=first,
        subsequent_indent=rest,
        break_long_words=False,
        break_on_hyphens=False,
    )
    return [line.replace(_NBSP, " ") for line in wrapped]


def to_json(
    findings: Sequence[Finding],
    *,
    inspected: Mapping[str, object] | None = None,
    strict: bool = False,
) -> str:
    """The findings for machines: one JSON document (keys stable, ``version`` 1)."""
    return json.dumps(
        {
            "version": 1,
            "inspected": dict(inspected or {}),
            "findings": [asdict(f) for f in findings],
            "errors": sum(f.severity == "error" for f in findings),
            "warnings": sum(f.severity == "warning" for f in findings),
            "exit_status": exit_status(findings, strict=strict),
        },
        indent=2,
    )
