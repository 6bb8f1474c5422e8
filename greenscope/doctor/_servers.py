"""The check of the server's request end: ``request-end-removal``.

Who removes each request's Sessions when it ends: greenscope's worker class, a
``post_request`` hook, the app itself (greenscope's WSGI middleware, a Flask teardown),
or nobody. Advice names greenscope.gunicorn's hooks only where they can be imported,
which needs gevent; without it, the WSGI middleware is the way.
"""

from __future__ import annotations

import greenscope
from greenscope.doctor._apps import NOTHING_REMOVES, app_removes
from greenscope.doctor._framework import Finding, Scan, Setup, register
from greenscope.doctor._workers import (
    calls_greenscope,
    gunicorn_hooks_usable,
    is_gunicorn_default,
)

__all__: list[str] = []  # checks are reached through the registry

_MIDDLEWARE = "wrap the app in `greenscope.wsgi.GreenscopeMiddleware(app)`"


@register("request-end-removal", tag="servers")
def _check_request_end(setup: Setup, scan: Scan) -> list[Finding]:
    """Who removes each request's Sessions: greenscope's worker, a hook, or the app."""
    if setup.celery is not None:
        return []  # a Celery worker: see celery-install
    check, kind, name, hook = (
        "request-end-removal",
        setup.kind,
        setup.worker_name,
        setup.post_request,
    )
    own_hook = kind in {"gevent", "threads"} and hook is not None and not is_gunicorn_default(hook)
    by_app = app_removes(setup.app) if kind not in {None, "greenscope"} else None
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
    elif own_hook and hook is not None and calls_greenscope(hook):
        finding = Finding(check, "ok", f"{name} with greenscope's post_request hook")
    elif own_hook:
        finding = Finding(
            check,
            "info",
            f"{name} with a post_request hook of your own ({getattr(hook, '__qualname__', hook)})",
            "make sure it calls `greenscope.gunicorn.post_request(worker, req, environ, resp)`"
            if gunicorn_hooks_usable()
            else "make sure it calls `greenscope.remove_current()`, or " + _MIDDLEWARE,
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
            "`from greenscope.gunicorn import post_request` in gunicorn.conf.py"
            if gunicorn_hooks_usable()
            # greenscope.gunicorn imports gevent: its hook would stop gunicorn from starting.
            else f"{_MIDDLEWARE} (greenscope.gunicorn's hooks need gevent, not installed here)",
        )
    elif kind == "gevent-pywsgi":
        finding = Finding(
            check,
            "error",
            f"{name} calls no post_request hook: {NOTHING_REMOVES}",
            "`-k greenscope.gunicorn.GeventPyWSGIWorker`, or wrap the app in "
            "greenscope.wsgi.GreenscopeMiddleware",
        )
    else:
        finding = Finding(
            check,
            "error",
            f"{name} without a post_request hook: {NOTHING_REMOVES}",
            "`-k greenscope.gunicorn.GeventWorker`, or greenscope's hooks in gunicorn.conf.py: "
            "`from greenscope.gunicorn import post_request` (and post_fork, worker_exit)",
        )
    return [finding]
