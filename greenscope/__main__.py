"""``python -m greenscope doctor``: check a deployment the way its gunicorn worker starts.

The doctor imports your app in this process in the order a gunicorn worker would, then
runs :func:`greenscope.doctor.diagnose` on the result, so problems that depend on import
order show up:

* gevent worker (``gevent``, ``gevent_pywsgi``, greenscope's workers, any subclass of
  gunicorn's ``GeventWorker``) without ``preload_app``: ``gevent.monkey.patch_all()``,
  then the app, as the worker's ``init_process`` does;
* with ``preload_app = True`` (``--preload``): the app first, unpatched, as the master
  loads it, then ``patch_all()``, as the forked worker does;
* any other worker (``sync``, ``gthread``): the app, unpatched.

The app is given as gunicorn takes it, ``APP`` (positional) or ``--app``. Settings come
from ``--gunicorn-config`` (or ``./gunicorn.conf.py`` when it exists, as gunicorn reads
it), executed before anything is patched, as gunicorn's master does; ``--worker-class``,
``--worker-connections``, ``--workers``, ``--preload`` and ``--chdir`` override it.
gunicorn's defaults fill the rest: worker_connections 1000, timeout 30, workers 1 (or
``$WEB_CONCURRENCY``), no preload.

With neither a config nor ``--worker-class`` the doctor assumes what greenscope
recommends, ``-k greenscope.gunicorn.GeventWorker`` without preload, with gunicorn's
defaults, and says so in the report's header: request-end removal is then not judged
(an ``info`` says so). gunicorn hooks (``post_fork``, ``post_worker_init``) are not run;
code they would run is not seen.

``--connect`` lets the max-connections check connect to each engine's database (5 s
connect timeout) to ask for its ``max_connections``; without it the limit is not checked.

Expected failures (an app that does not import, a worker class that does not load) print
one line saying what to do; ``--traceback`` adds the traceback. A reader that stops early
(``| head``) ends the output quietly.

Exit status: 0 when nothing is wrong, 1 on an ``error`` finding (with ``--strict`` also
on a ``warning``) or when stdout was closed before the report was written, 2 on a usage
error or when the config or the app cannot be loaded.

.. versionadded:: 0.1
"""

from __future__ import annotations

import argparse
import ast
import importlib.machinery
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from greenscope import doctor
from greenscope.doctor._workers import GEVENT_KINDS, worker_kind

__all__ = ["main"]

_ASSUMED = "greenscope.gunicorn.GeventWorker"

# gunicorn's defaults (gunicorn/config.py), for when no gunicorn Config is read: the
# worker started with nothing set gets these, and the doctor must judge what it gets.
_DEFAULT_WORKER_CONNECTIONS = 1000
_DEFAULT_TIMEOUT = 30


def _default_workers() -> int:
    """gunicorn's default ``workers``: ``$WEB_CONCURRENCY``, else 1."""
    try:
        return max(1, int(os.environ.get("WEB_CONCURRENCY", "1")))
    except ValueError:
        return 1


_DESCRIPTION = """\
Check a gevent + SQLAlchemy deployment: gevent patching, database drivers and their
import order, SQLite, pool sizes, SQLAlchemy scoped_sessions, request-end removal.

The app is imported in this process in the order the gunicorn worker uses: a gevent
worker patches first and then imports the app, or with preload_app imports it first
(in the master) and patches after (in the worker); other workers do not patch.
Without --gunicorn-config (or ./gunicorn.conf.py) and --worker-class, the worker is
assumed to be greenscope.gunicorn.GeventWorker without preload, with gunicorn's defaults
(worker_connections 1000, timeout 30, workers 1 or $WEB_CONCURRENCY); the report's
header says so. GUNICORN_CMD_ARGS is not read: pass those settings as flags here.
"""

_EPILOG = """\
exit status: 0 no problem, 1 an error (--strict: or a warning) or stdout closed early,
2 usage error or the config or app failed to load (--traceback shows why).

examples:
  python -m greenscope doctor myapp:app
  python -m greenscope doctor -c gunicorn.conf.py 'myapp:create_app()'
  python -m greenscope doctor -k gevent --worker-connections 100 -w 4 --connect myapp:app
  python -m greenscope doctor --celery proj.celery:app -P gevent --concurrency 100
"""


class _UsageError(Exception):
    """Nothing was checked: print the message in one line, exit 2.

    Raised ``from`` the exception that caused it, if any: ``--traceback`` prints that.
    """


def _reason(exc: BaseException) -> str:
    """An exception in one line: its message's first line and its type.

    gunicorn's ``load_class`` wraps the ImportError in a RuntimeError whose message is
    a whole traceback: the ImportError it handled (``__context__``) says it better.
    """
    if isinstance(exc, RuntimeError) and isinstance(exc.__context__, ImportError | AttributeError):
        exc = exc.__context__
    lines = str(exc).strip().splitlines()
    return f"{lines[0]} ({type(exc).__name__})" if lines else type(exc).__name__


_SEE_TRACEBACK = "--traceback shows where it failed"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m greenscope")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cmd = commands.add_parser(
        "doctor",
        help="check a gevent + SQLAlchemy deployment",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmd.add_argument(
        "app_arg",
        nargs="?",
        metavar="APP",
        help="the WSGI app as gunicorn takes it (module:name or module:factory(...)); "
        "default: the config's wsgi_app",
    )
    cmd.add_argument("--app", metavar="MODULE:CALLABLE", help="the same as APP")
    cmd.add_argument(
        "-c",
        "--gunicorn-config",
        metavar="FILE",
        help="gunicorn config file (or python:MODULE); default ./gunicorn.conf.py if present",
    )
    cmd.add_argument("--worker-class", "-k", metavar="NAME", help="gunicorn worker class")
    cmd.add_argument(
        "--worker-connections", type=_positive, metavar="N", help="gunicorn worker_connections"
    )
    cmd.add_argument(
        "-w",
        "--workers",
        type=_positive,
        metavar="N",
        help="gunicorn workers: processes, each with its own pools (default 1)",
    )
    cmd.add_argument(
        "--preload",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="as gunicorn's preload_app (--no-preload overrides the config)",
    )
    cmd.add_argument("--chdir", metavar="DIR", help="as gunicorn's chdir")
    cmd.add_argument(
        "--celery",
        metavar="MODULE[:APP]",
        help="check a Celery worker of this app instead of a gunicorn app (as `celery -A`)",
    )
    cmd.add_argument(
        "-P",
        "--pool",
        choices=["prefork", "gevent", "threads", "solo"],
        help="with --celery: the worker's pool, as `celery worker -P` (default prefork)",
    )
    cmd.add_argument(
        "--concurrency",
        type=_positive,
        metavar="N",
        help="with --celery: as `celery worker -c` (default: the app's worker_concurrency, "
        "else the number of CPUs)",
    )
    cmd.add_argument(
        "--connect",
        action="store_true",
        help="connect to each engine's database (5 s timeout) to compare "
        "workers x (pool_size + max_overflow) with its max_connections",
    )
    cmd.add_argument("--json", action="store_true", help="print JSON instead of text")
    cmd.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    cmd.add_argument(
        "--traceback",
        action="store_true",
        help="when the config, worker class or app fails to load, show the traceback",
    )
    return parser


def _read_config(location: str) -> dict[str, Any]:
    """The module-level names of a gunicorn config, executed as gunicorn executes it."""
    try:
        if location.startswith("python:"):
            return vars(import_module(location.removeprefix("python:")))
        path = location.removeprefix("file:")
        if not os.path.exists(path):
            raise _UsageError(f"config file {path!r} does not exist")
        loader = importlib.machinery.SourceFileLoader("__config__", path)
        spec = importlib.util.spec_from_file_location("__config__", path, loader=loader)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["__config__"] = module
        loader.exec_module(module)
    except _UsageError:
        raise
    except (Exception, SystemExit) as exc:
        raise _UsageError(
            f"cannot read the gunicorn config {location!r}: {_reason(exc)}; fix it "
            f"(gunicorn would fail on it too): {_SEE_TRACEBACK}"
        ) from exc
    return vars(module)


@dataclass(frozen=True)
class _Deployment:
    """The settings that matter to the doctor, after the config file and the flags."""

    config: str | None
    worker_class: str | type | None  # None: not given, greenscope's worker assumed
    worker_name: str
    worker_connections: int
    threads: int
    workers: int
    timeout: float
    preload: bool
    post_request: Callable[..., object] | None
    wsgi_app: str | None
    chdir: str
    pythonpath: str | None


def _deployment(args: argparse.Namespace) -> _Deployment:
    """Read the config (or ./gunicorn.conf.py) with gunicorn's Config; apply the flags."""
    location = args.gunicorn_config
    if location is None and os.path.exists("gunicorn.conf.py"):
        location = "gunicorn.conf.py"
    if location is None and args.worker_class is None:
        return _Deployment(
            config=None,
            worker_class=None,
            worker_name=_ASSUMED,
            worker_connections=args.worker_connections or _DEFAULT_WORKER_CONNECTIONS,
            threads=1,
            workers=args.workers or _default_workers(),
            timeout=_DEFAULT_TIMEOUT,
            preload=bool(args.preload),
            post_request=None,
            wsgi_app=None,
            chdir=args.chdir or os.getcwd(),
            pythonpath=None,
        )
    try:
        from gunicorn.config import Config  # noqa: PLC0415 - optional
    except ImportError as exc:
        raise _UsageError(
            "reading gunicorn settings needs gunicorn: pip install 'greenscope[gunicorn]'"
        ) from exc
    cfg = Config()
    if location is not None:
        for key, value in _read_config(location).items():
            if key in cfg.settings:
                try:
                    cfg.set(key.lower(), value)
                except Exception as exc:
                    raise _UsageError(f"invalid value for {key} in {location}: {exc}") from exc
    for key, value in (
        ("worker_class", args.worker_class),
        ("worker_connections", args.worker_connections),
        ("workers", args.workers),
        ("preload_app", args.preload),
        ("chdir", args.chdir),
    ):
        if value is not None:
            try:
                cfg.set(key, value)
            except Exception as exc:
                raise _UsageError(f"invalid {key.replace('_', '-')} {value!r}: {exc}") from exc
    try:
        cfg.worker_class  # noqa: B018 - loads the class, as gunicorn's master does
    except Exception as exc:
        raise _UsageError(
            f"cannot load worker class {cfg.worker_class_str!r}: {_reason(exc)}; give a "
            "gunicorn short name (sync, gthread, gevent) or an importable dotted path, "
            f"such as {_ASSUMED} ({_SEE_TRACEBACK})"
        ) from exc
    worker_class = cfg.settings["worker_class"].get()
    name = str(cfg.worker_class_str)
    if name in {"sync", "gunicorn.workers.sync.SyncWorker"} and cfg.threads > 1:
        worker_class = name = "gthread"  # gunicorn switches to gthread too
    return _Deployment(
        config=location,
        worker_class=worker_class,
        worker_name=name,
        worker_connections=cfg.worker_connections,
        threads=cfg.threads,
        workers=cfg.workers,
        timeout=cfg.timeout,
        preload=bool(cfg.preload_app),
        post_request=cfg.post_request,
        wsgi_app=cfg.wsgi_app,
        chdir=cfg.chdir,
        pythonpath=cfg.pythonpath,
    )


def _load_app(uri: str) -> object:
    """Import ``module[:name | :factory(literal args)]`` as gunicorn's import_app does."""
    module_name, _, expr = uri.partition(":")
    expr = expr or "application"
    try:
        node = ast.parse(expr, mode="eval").body
    except SyntaxError as exc:
        raise _UsageError(f"cannot parse {expr!r} as a name or a call") from exc
    call = isinstance(node, ast.Call)
    func = node.func if isinstance(node, ast.Call) else node
    if not isinstance(func, ast.Name):
        raise _UsageError(f"{expr!r}: give a name or a call of a name, as gunicorn takes it")
    if call and any(k.arg is None for k in node.keywords):  # type: ignore[attr-defined]
        raise _UsageError(f"{expr!r}: **kwargs cannot be given on the command line")
    what = "import" if not call else "import or call"
    try:
        module = import_module(module_name)
        app: Any = getattr(module, func.id, _MISSING)
        if app is not _MISSING and isinstance(node, ast.Call):
            args = [ast.literal_eval(a) for a in node.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
            app = app(*args, **kwargs)
    except (Exception, SystemExit) as exc:  # SystemExit: an app that refuses to start
        raise _UsageError(
            f"cannot {what} the app {uri!r}: {_reason(exc)}; nothing was checked. "
            + _import_hint(exc, module_name)
        ) from exc
    if app is _MISSING:
        raise _UsageError(
            f"cannot {what} the app {uri!r}: module {module_name!r} has no {func.id!r}; "
            "nothing was checked. Check the name after the colon (MODULE:NAME or "
            "MODULE:FACTORY(...))"
        )
    return app


_MISSING = object()


def _import_hint(exc: BaseException, module_name: str) -> str:
    """What to do when a module does not import: where to look first."""
    missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
    if missing and (module_name == missing or module_name.startswith(missing + ".")):
        return (
            f"Run the doctor where {module_name!r} can be imported, or pass --chdir DIR, "
            "as you would to gunicorn"
        )
    return f"The import raised it: {_SEE_TRACEBACK}"


def _patch_all(needs: str = "the worker class") -> None:
    try:
        from gevent import monkey  # noqa: PLC0415 - never before the config is read
    except ImportError as exc:
        raise _UsageError(f"{needs} needs gevent: pip install 'greenscope[gunicorn]'") from exc
    monkey.patch_all()


def _load_celery(uri: str) -> Any:
    """Import a Celery app as ``celery -A`` does: ``module:name``, or ``module`` holding
    ``app`` or ``celery``."""
    module_name, _, name = uri.partition(":")
    try:
        module = import_module(module_name)
    except (Exception, SystemExit) as exc:
        raise _UsageError(
            f"cannot import the Celery app {uri!r}: {_reason(exc)}; nothing was checked. "
            + _import_hint(exc, module_name)
        ) from exc
    for attr in [name] if name else ["app", "celery"]:
        app = getattr(module, attr, None)
        if app is not None and hasattr(app, "conf") and hasattr(app, "tasks"):
            return app
    raise _UsageError(
        f"no Celery app in {uri!r}: give MODULE:NAME (as `celery -A`), e.g. proj.celery:app"
    )


def _doctor_celery(args: argparse.Namespace) -> int:
    if args.chdir:
        try:
            os.chdir(args.chdir)
        except OSError as exc:
            raise _UsageError(f"cannot change to the directory {args.chdir!r}: {exc}") from exc
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `celery -A` imports from the working directory
    pool = args.pool or "prefork"
    if pool == "gevent":
        _patch_all("-P gevent")  # `celery worker -P gevent` patches before it imports the app
        order = "patch-then-app"
    else:
        order = "app-only"
    app = _load_celery(args.celery)
    concurrency = args.concurrency or app.conf.worker_concurrency or os.cpu_count() or 1
    findings = doctor.diagnose(
        celery_app=app,
        celery_pool=pool,
        worker_connections=concurrency if pool == "gevent" else None,
        threads=concurrency if pool == "threads" else 1,
        # The prefork pool forks `concurrency` processes, each with its own pools.
        workers=concurrency if pool == "prefork" else 1,
        connect=args.connect,
    )
    inspected: dict[str, Any] = {
        "celery": args.celery,
        "pool": pool,
        "concurrency": concurrency,
        "order": order,
    }
    if args.json:
        print(doctor.to_json(findings, inspected=inspected, strict=args.strict))
    else:
        header = {
            "celery": args.celery,
            "worker": f"-P {pool} -c {concurrency}"
            + ("" if pool in {"gevent", "threads"} else " (one task at a time per process)"),
            "order": "gevent.monkey.patch_all(), then the app (as `celery worker -P gevent`)"
            if order == "patch-then-app"
            else "the app, unpatched",
        }
        print(doctor.report(findings, inspected=header, strict=args.strict), end="")
    return doctor.exit_status(findings, strict=args.strict)


def _app_given(args: argparse.Namespace) -> str | None:
    """The app from APP or --app (the same thing, as gunicorn takes either)."""
    if args.app and args.app_arg and args.app != args.app_arg:
        raise _UsageError(
            f"the app is given twice, as APP {args.app_arg!r} and as --app {args.app!r}: "
            "give it once"
        )
    app: str | None = args.app or args.app_arg
    return app


def _doctor(args: argparse.Namespace) -> int:
    args.app = _app_given(args)
    if args.celery:
        if args.app or args.gunicorn_config or args.worker_class or args.workers:
            raise _UsageError(
                "--celery checks a Celery worker (give its -P and --concurrency): "
                "not with APP, --app, -c, -k or -w"
            )
        return _doctor_celery(args)
    if args.pool or args.concurrency:
        raise _UsageError("--pool and --concurrency go with --celery MODULE[:APP]")
    setup = _deployment(args)
    assumed = setup.worker_class is None
    kind = "greenscope" if assumed else worker_kind(setup.worker_class)
    uri = args.app or setup.wsgi_app
    if not uri:
        raise _UsageError(
            "give the app, as gunicorn takes it: python -m greenscope doctor MODULE:CALLABLE "
            "(or wsgi_app in the config)"
        )

    # As gunicorn: chdir, then the directory and the pythonpath setting go on sys.path.
    try:
        os.chdir(setup.chdir)
    except OSError as exc:
        raise _UsageError(f"cannot change to the directory {setup.chdir!r}: {exc}") from exc
    # gunicorn: each pythonpath entry made absolute and put first, then chdir before them.
    extra = [os.path.abspath(p) for p in (setup.pythonpath or "").split(",") if p]
    for path in [*extra, setup.chdir]:
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)

    needs = (
        f"{_ASSUMED}, assumed without a config or -k (give yours, e.g. -k sync),"
        if assumed
        else "the worker class"
    )
    if kind not in GEVENT_KINDS:
        app = _load_app(uri)
        order = "app-only"
    elif setup.preload:
        app = _load_app(uri)  # in the master, unpatched
        _patch_all(needs)  # in the forked worker's init_process
        order = "app-then-patch"
    else:
        _patch_all(needs)
        app = _load_app(uri)
        order = "patch-then-app"

    findings = doctor.diagnose(
        worker_connections=setup.worker_connections,
        threads=setup.threads,
        worker_class=setup.worker_class or _ASSUMED,
        worker_class_assumed=assumed,
        worker_timeout=setup.timeout,
        post_request=setup.post_request,
        app=app,
        workers=setup.workers,
        connect=args.connect,
    )
    inspected: dict[str, Any] = {
        "app": uri,
        "config": setup.config,
        "worker_class": setup.worker_name,
        "worker_class_assumed": assumed,
        "worker_connections": setup.worker_connections,
        "threads": setup.threads,
        "workers": setup.workers,
        "timeout": setup.timeout,
        "preload_app": setup.preload,
        "order": order,
    }
    if args.json:
        print(doctor.to_json(findings, inspected=inspected, strict=args.strict))
    else:
        print(doctor.report(findings, inspected=_header(inspected), strict=args.strict), end="")
    return doctor.exit_status(findings, strict=args.strict)


def _header(inspected: dict[str, Any]) -> dict[str, str]:
    """The human form of what was inspected."""
    if inspected["worker_class_assumed"]:
        worker = f"{inspected['worker_class']} (assumed)"
    else:
        worker = str(inspected["worker_class"])
    details = []
    if inspected["order"] != "app-only":
        details.append(f"worker_connections {inspected['worker_connections']}")
    elif worker == "gthread":
        details.append(f"threads {inspected['threads']}")
    details.append(f"timeout {inspected['timeout']:g} s")
    details.append(f"workers {inspected['workers']}")
    order = {
        "patch-then-app": "gevent.monkey.patch_all(), then the app (as the worker does)",
        "app-then-patch": "the app (preload_app: in the master), then patch_all() (in the worker)",
        "app-only": "the app, unpatched (not a gevent worker)",
    }[inspected["order"]]
    return {
        "app": inspected["app"],
        "config": inspected["config"]
        or (
            "none, no --worker-class: greenscope's worker and gunicorn's defaults assumed"
            if inspected["worker_class_assumed"]
            else "none: gunicorn's defaults"
        ),
        "worker": ", ".join([worker, *details]),
        "order": order,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    try:
        status = _doctor(args)
        sys.stdout.flush()  # here, not at exit: a closed pipe must surface where it is handled
    except _UsageError as exc:
        if args.traceback and exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__, file=sys.stderr)
        print(f"greenscope doctor: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`| head`): not an error of the doctor's to report. Point
        # stdout at devnull so the interpreter's own flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
