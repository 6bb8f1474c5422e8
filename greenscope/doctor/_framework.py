"""The doctor's framework: findings, the check registry, one gc scan, running, output.

The model is Django's system-check framework (``django/core/checks``). A check is a
small function ``(Setup, Scan) -> list[Finding]`` registered with :func:`register`
under a stable id from :data:`CHECKS` and a tag naming its family; the family modules
(``_gevent``, ``_pools``, ``_registries``, ``_servers``, ``_celery``) hold the checks and
nothing here knows them. :func:`diagnose` describes the deployment once (:class:`Setup`),
scans the process once (:class:`Scan`), runs every registered check in the order of
:data:`CHECKS`, and turns a check that raises into a ``warning``. :func:`report` and
:func:`to_json` format the findings.

::

    CHECKS (ids, report order)      _REGISTRY: id -> Check(id, tag, func)
         |                                 ^
         |                                 | @register("pool-size", tag="pools")
         v                                 |
    diagnose(...) -> Setup, Scan -> run every Check in CHECKS order -> [Finding, ...]
"""

from __future__ import annotations

import gc
import json
import re
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import import_module
from types import ModuleType
from typing import Any, Literal, TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.util import ScopedRegistry

from greenscope.doctor._workers import WorkerKind, worker_kind, worker_name

__all__ = [
    "CHECKS",
    "Finding",
    "Scan",
    "Setup",
    "Severity",
    "Tag",
    "connect_args",
    "diagnose",
    "engine_label",
    "engine_noun",
    "exit_status",
    "gevent_monkey",
    "patched",
    "plural",
    "register",
    "report",
    "summary",
    "to_json",
]

Severity = Literal["ok", "info", "warning", "error"]

# The check families, as Django's ``Tags``: one module each.
Tag = Literal["gevent", "pools", "registries", "servers", "celery"]

CHECKS = (
    "gevent-patch",
    "psycopg-import-order",
    "psycopg2-wait-callback",
    "sqlite-blocking",
    "pool-size",
    "max-connections",
    "known-engines",
    "engine-guard",
    "gc",
    "stock-scoped-session",
    "request-end-removal",
    "celery-install",
    "celery-soft-time-limit",
)
"""Every check id, in report order."""


@dataclass(frozen=True)
class Finding:
    """One result of one check: what was found and, unless ``ok``, what to do.

    ``check`` is one of :data:`CHECKS`. ``severity``: ``ok`` (checked, fine), ``info``
    (worth knowing, or not checkable), ``warning`` (fine for development, review it
    before production), ``error`` (will hurt in production). ``fix`` is the hint.
    """

    check: str
    severity: Severity
    message: str
    fix: str = ""


@dataclass(frozen=True)
class Setup:
    """What diagnose() was told about the deployment."""

    kind: WorkerKind | None
    worker_name: str | None
    concurrency: int | None
    concurrency_setting: str
    worker_timeout: float | None
    post_request: Callable[..., object] | None
    app: object
    assumed: bool = False
    celery: Any = None  # the Celery app, when checking a Celery worker
    pool: str | None = None  # its pool: gevent, prefork, threads, solo
    workers: int | None = None  # processes, each with its own pools
    connect: bool = False  # may checks connect to the databases (max-connections)?


@dataclass
class Scan:
    """What one gc pass found."""

    engines: list[Engine] = field(default_factory=list)
    stock_registries: list[ScopedRegistry[Any]] = field(default_factory=list)


CheckFunc = Callable[[Setup, Scan], list[Finding]]
_F = TypeVar("_F", bound=CheckFunc)


@dataclass(frozen=True)
class _Check:
    id: str
    tag: Tag
    func: CheckFunc


_REGISTRY: dict[str, _Check] = {}


def register(check_id: str, *, tag: Tag) -> Callable[[_F], _F]:
    """Register a check function under ``check_id`` (one of :data:`CHECKS`)."""
    if check_id not in CHECKS:
        # The report order is CHECKS: a check missing there would never run.
        raise ValueError(f"unknown check id {check_id!r}: add it to CHECKS, in report order")

    def decorator(func: _F) -> _F:
        if check_id in _REGISTRY:
            raise ValueError(f"check {check_id!r} is registered twice")
        _REGISTRY[check_id] = _Check(check_id, tag, func)
        return func

    return decorator


def _registered() -> list[_Check]:
    """The registered checks, in report order."""
    return [_REGISTRY[check_id] for check_id in CHECKS if check_id in _REGISTRY]


# -- the process -----------------------------------------------------------------------


def gevent_monkey() -> ModuleType | None:
    """gevent.monkey, or None without gevent (importing it patches nothing)."""
    try:
        return import_module("gevent.monkey")
    except ImportError:
        return None


def patched(module: str) -> bool:
    """Whether gevent patched ``module`` in this process."""
    monkey = gevent_monkey()
    return monkey is not None and bool(monkey.is_module_patched(module))


def _scan() -> Scan:
    """Engines and non-greenscope registries alive in the process, in one gc pass.

    Classified by ``type()``, never ``isinstance()``: that would ask each object for
    ``__class__``, which proxies (werkzeug's LocalProxy) answer by running code. An
    ``AsyncEngine`` is found through the sync ``Engine`` it wraps (whose
    ``dialect.is_async`` is true).
    """
    found = Scan()
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
    found.engines.sort(key=engine_label)
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


def engine_label(engine: Engine) -> str:
    """The engine's URL, password hidden."""
    return engine.url.render_as_string(hide_password=True)


def engine_noun(engine: Engine) -> str:
    """``engine``, or ``async engine`` for the sync Engine inside an AsyncEngine."""
    return "async engine" if engine.dialect.is_async else "engine"


def connect_args(engine: Engine) -> tuple[list[Any], dict[str, Any]]:
    """The arguments the engine gives its driver's ``connect()``, as far as visible.

    create_engine keeps the URL's arguments merged with ``connect_args`` in the closure
    it pools (``cargs_tup``, ``cparams``, in SQLAlchemy 2.0 and 2.1); an engine made with
    ``creator=`` has none, so the URL's are returned. ``do_connect`` listeners are not run.
    """
    cargs, cparams = engine.dialect.create_connect_args(engine.url)
    args, params = list(cargs), dict(cparams)
    creator = getattr(engine.pool, "_creator", None)
    code = getattr(creator, "__code__", None)
    closure = getattr(creator, "__closure__", None)
    if code is not None and closure:
        cells = dict(zip(code.co_freevars, closure, strict=True))
        if "cparams" in cells and isinstance(cells["cparams"].cell_contents, Mapping):
            params = dict(cells["cparams"].cell_contents)
        if "cargs_tup" in cells and isinstance(cells["cargs_tup"].cell_contents, Sequence):
            args = list(cells["cargs_tup"].cell_contents)
    return args, params


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 error``, ``2 errors``."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


# -- running ---------------------------------------------------------------------------


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
    workers: int | None = None,
    connect: bool = False,
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
    concurrency. ``workers`` is the number of processes (gunicorn's ``workers``), each
    with its own pools; with ``connect=True`` the max-connections check connects to
    each engine's database (5 s timeout) and asks for its ``max_connections``. A check
    that fails is reported as a ``warning`` naming the exception, never raised.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2 ``workers`` and ``connect``.
    """
    if celery_app is not None:
        worker_class = {"gevent": "gevent", "threads": "gthread"}.get(celery_pool or "", "sync")
    kind = worker_kind(worker_class)
    if kind == "threads":
        sync = worker_name(worker_class) in {"sync", "gunicorn.workers.sync.SyncWorker"}
        concurrency, setting = (1 if sync else threads), "threads"
    else:
        concurrency, setting = worker_connections, "worker_connections"
    if celery_app is not None:
        setting = "worker_concurrency (-c)" if celery_pool in {"gevent", "threads"} else setting
    setup = Setup(
        kind=kind,
        worker_name=worker_name(worker_class),
        concurrency=concurrency,
        concurrency_setting=setting,
        worker_timeout=worker_timeout,
        post_request=post_request,
        app=app,
        assumed=worker_class_assumed,
        celery=celery_app,
        pool=celery_pool,
        workers=workers,
        connect=connect,
    )
    scan = _scan()
    findings: list[Finding] = []
    for check in _registered():
        try:
            findings.extend(check.func(setup, scan))
        except Exception as exc:  # a check must never take the worker or the report down
            findings.append(
                Finding(check.id, "warning", f"the check failed: {exc!r}", "please report it")
            )
    return findings


# -- output ----------------------------------------------------------------------------

_LABEL: dict[str, str] = {"ok": "ok", "info": "info", "warning": "WARN", "error": "ERROR"}
_WRAP = 100


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
            plural(errors, "error") if errors else "",
            plural(warnings, "warning") if warnings else "",
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
