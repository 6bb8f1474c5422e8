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

Settings come from ``--gunicorn-config`` (or ``./gunicorn.conf.py`` when it exists, as
gunicorn reads it), executed before anything is patched, as gunicorn's master does;
``--worker-class``, ``--worker-connections``, ``--preload`` and ``--chdir`` override it.
gunicorn's defaults fill the rest: worker_connections 1000, timeout 30, no preload.

With neither a config nor ``--worker-class`` the doctor assumes what greenscope
recommends, ``-k greenscope.gunicorn.GeventWorker`` without preload, and says so:
request-end removal is then not judged (an ``info`` says so), and the pool check only
runs with ``--worker-connections``. gunicorn hooks (``post_fork``, ``post_worker_init``) are not
run; code they would run is not seen.

Exit status: 0 when nothing is wrong, 1 on an ``error`` finding (with ``--strict`` also
on a ``warning``), 2 on a usage error or when the config or the app cannot be loaded.

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

__all__ = ["main"]

_ASSUMED = "greenscope.gunicorn.GeventWorker"

_DESCRIPTION = """\
Check a gevent + SQLAlchemy deployment: gevent patching, database drivers and their
import order, SQLite, pool sizes, SQLAlchemy scoped_sessions, request-end removal.

The app is imported in this process in the order the gunicorn worker uses: a gevent
worker patches first and then imports the app, or with preload_app imports it first
(in the master) and patches after (in the worker); other workers do not patch.
Without --gunicorn-config (or ./gunicorn.conf.py) and --worker-class, the worker is
assumed to be greenscope.gunicorn.GeventWorker without preload, worker_connections
unknown. GUNICORN_CMD_ARGS is not read: pass those settings as flags here.
"""

_EPILOG = """\
exit status: 0 no problem, 1 an error (--strict: or a warning), 2 usage error or the
config or app failed to load.

examples:
  python -m greenscope doctor --app myapp:app
  python -m greenscope doctor -c gunicorn.conf.py --app myapp:create_app()
  python -m greenscope doctor --worker-class gevent --worker-connections 100 --app myapp:app
  python -m greenscope doctor --celery proj.celery:app -P gevent --concurrency 100
"""


class _UsageError(Exception):
    """Nothing was checked: print the message (and the traceback, if any), exit 2."""

    def __init__(self, message: str, *, show_traceback: bool = False) -> None:
        super().__init__(message)
        self.show_traceback = show_traceback


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
        "--app",
        metavar="MODULE:CALLABLE",
        help="the WSGI app as gunicorn takes it (module:name or module:factory(...)); "
        "default: the config's wsgi_app",
    )
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
    cmd.add_argument("--json", action="store_true", help="print JSON instead of text")
    cmd.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
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
            f"cannot read the gunicorn config {location!r}: {exc!r}", show_traceback=True
        ) from exc
    return vars(module)


@dataclass(frozen=True)
class _Deployment:
    """The settings that matter to the doctor, after the config file and the flags."""

    config: str | None
    worker_class: str | type | None  # None: not given, greenscope's worker assumed
    worker_name: str
    worker_connections: int | None
    threads: int
    timeout: float | None
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
            worker_connections=args.worker_connections,  # None: unknown
            threads=1,
            timeout=None,
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
            f"cannot load worker class {cfg.worker_class_str!r}: {exc!r}", show_traceback=True
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
    try:
        module = import_module(module_name)
        app = getattr(module, func.id)
        if isinstance(node, ast.Call):
            args = [ast.literal_eval(a) for a in node.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
            app = app(*args, **kwargs)
    except (Exception, SystemExit) as exc:  # SystemExit: an app that refuses to start
        what = "import" if not call else "import or call"
        raise _UsageError(
            f"cannot {what} the app {uri!r}: {exc!r} (nothing was checked)",
            show_traceback=True,
        ) from exc
    return app


def _patch_all() -> None:
    try:
        from gevent import monkey  # noqa: PLC0415 - never before the config is read
    except ImportError as exc:
        raise _UsageError(
            "the worker class needs gevent: pip install 'greenscope[gunicorn]'"
        ) from exc
    monkey.patch_all()


def _load_celery(uri: str) -> Any:
    """Import a Celery app as ``celery -A`` does: ``module:name``, or ``module`` holding
    ``app`` or ``celery``."""
    module_name, _, name = uri.partition(":")
    try:
        module = import_module(module_name)
    except (Exception, SystemExit) as exc:
        raise _UsageError(
            f"cannot import the Celery app {uri!r}: {exc!r} (nothing was checked)",
            show_traceback=True,
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
        _patch_all()  # `celery worker -P gevent` patches before it imports the app
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


def _doctor(args: argparse.Namespace) -> int:
    if args.celery:
        if args.app or args.gunicorn_config or args.worker_class:
            raise _UsageError("--celery checks a Celery worker: not with --app, -c or -k")
        return _doctor_celery(args)
    if args.pool or args.concurrency:
        raise _UsageError("--pool and --concurrency go with --celery MODULE[:APP]")
    setup = _deployment(args)
    assumed = setup.worker_class is None
    kind = "greenscope" if assumed else doctor._worker_kind(setup.worker_class)
    uri = args.app or setup.wsgi_app
    if not uri:
        raise _UsageError("give the app: --app MODULE:CALLABLE (or wsgi_app in the config)")

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

    if kind not in doctor._GEVENT_KINDS:
        app = _load_app(uri)
        order = "app-only"
    elif setup.preload:
        app = _load_app(uri)  # in the master, unpatched
        _patch_all()  # in the forked worker's init_process
        order = "app-then-patch"
    else:
        _patch_all()
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
    )
    inspected: dict[str, Any] = {
        "app": uri,
        "config": setup.config,
        "worker_class": setup.worker_name,
        "worker_class_assumed": assumed,
        "worker_connections": setup.worker_connections,
        "threads": setup.threads,
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
        worker = f"{inspected['worker_class']} (assumed: no config, no --worker-class)"
    else:
        worker = str(inspected["worker_class"])
    details = []
    if inspected["order"] != "app-only":
        connections = inspected["worker_connections"]
        details.append(f"worker_connections {'unknown' if connections is None else connections}")
    elif worker == "gthread":
        details.append(f"threads {inspected['threads']}")
    if inspected["timeout"] is not None:
        details.append(f"timeout {inspected['timeout']:g} s")
    order = {
        "patch-then-app": "gevent.monkey.patch_all(), then the app (as the worker does)",
        "app-then-patch": "the app (preload_app: in the master), then patch_all() (in the worker)",
        "app-only": "the app, unpatched (not a gevent worker)",
    }[inspected["order"]]
    return {
        "app": inspected["app"],
        "config": inspected["config"] or "none",
        "worker": ", ".join([worker, *details]),
        "order": order,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    try:
        return _doctor(args)
    except _UsageError as exc:
        if exc.show_traceback and exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__, file=sys.stderr)
        print(f"greenscope doctor: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
