"""gunicorn integration: remove each request's Sessions when the request ends.

Under ``gunicorn -k gevent`` one greenlet serves every keep-alive request of a connection,
so greenlet death is not request end: without removal, the next request on the
connection inherits the previous one's identity map and open transaction, and the pool
connection stays checked out while the client idles.

Two ways in:

* Worker classes, the whole setup in one flag::

      gunicorn -k greenscope.gunicorn.GeventWorker app:app
      gunicorn -k greenscope.gunicorn.GeventPyWSGIWorker app:app

  They remove the request greenlet's Sessions (from every request-scoped greenscope
  registry) after each request, once the response iterable is closed: also when the app
  raises, when the client disconnects mid-stream, and when a shutdown the worker runs
  itself (SIGHUP reload, ``max_requests``) kills a request that outlived
  ``graceful_timeout``. ``GeventPyWSGIWorker`` covers gevent's pywsgi server, which
  calls no ``post_request`` hook at all. Both also do what the hooks below do at fork
  and exit, and at start what ``post_worker_init`` does.

* Hooks, for the stock ``-k gevent`` worker, imported into *your* ``gunicorn.conf.py``
  (gunicorn loads one config file, so greenscope ships none that would replace yours)::

      from greenscope.gunicorn import post_fork, post_request, worker_exit
      from greenscope.gunicorn import post_worker_init  # optional: the checks below

  To keep a hook of your own, call ours from it::

      from greenscope import gunicorn as greenscope_hooks

      def post_request(worker, req, environ, resp):
          my_metrics(req, resp)
          greenscope_hooks.post_request(worker, req, environ, resp)

  ``-k gevent_pywsgi`` calls no ``post_request``: use ``GeventPyWSGIWorker`` or
  :mod:`greenscope.wsgi` instead.

At worker start (``post_worker_init``, or greenscope's workers by themselves) the
checks of :mod:`greenscope.doctor` run once per worker process, after gevent patched it
and the app was loaded, and each warning and error is logged through gunicorn's logger
(for example psycopg imported before patching, a pool smaller than
``worker_connections``, SQLite). ``GREENSCOPE_DOCTOR=0`` in the environment turns that
off; ``python -m greenscope doctor`` prints the full report.

What is not covered: SIGQUIT (immediate shutdown) and SIGKILL run no ``finally``, and
on SIGTERM the master SIGKILLs workers that still run after ``graceful_timeout``: the
database rolls back a dropped connection's transaction. Registries with a custom
``scopefunc`` are SQLAlchemy's and are not touched. Fresh pools after fork are given to
every engine greenscope knows: those bound by a greenscope registry's sessionmaker
(``bind=`` and ``binds=``), ``greenscope.flask``'s, and those passed to
:func:`greenscope.register_engine`.

.. versionadded:: 0.1
"""

from __future__ import annotations

import logging
import os
from typing import Any

try:
    import gevent
    from gunicorn.workers import ggevent
except (ImportError, RuntimeError) as exc:  # ggevent raises RuntimeError without gevent
    raise ImportError(
        "greenscope.gunicorn needs gunicorn with its gevent extra; "
        "install it with: pip install 'greenscope[gunicorn]'"
    ) from exc

import greenscope
from greenscope import _engines

__all__ = [
    "GeventPyWSGIWorker",
    "GeventWorker",
    "post_fork",
    "post_request",
    "post_worker_init",
    "worker_exit",
]


def _after_fork() -> None:
    """In a forked worker: never use or close what the master opened.

    With ``--preload`` the app, its engines and possibly Sessions were created in the
    master, and their connections' sockets are shared with it. greenscope's core already
    does this at fork (``os.register_at_fork``): it forgets inherited Sessions without
    closing them and gives every engine it knows a fresh pool. Called again here, where
    gunicorn runs its hook, for engines registered between fork and this point (a
    no-op otherwise).
    """
    _engines.dispose_after_fork()


def _end_request(log: Any) -> None:
    try:
        greenscope.remove_current()
    except gevent.GreenletExit:
        pass  # killed during close (graceful timeout): the worker is going away anyway
    except Exception:  # pragma: no cover - remove_current logs and swallows Exceptions
        log.exception("greenscope: removing the request's Sessions failed")


def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:
    """gunicorn hook: remove the finished request's Sessions.

    gunicorn runs it in the request's greenlet, after the response iterable's
    ``close()``, also when the app raised or the client went away. A kill during the
    removal is swallowed as gunicorn's gevent worker does: on the HTTP/2 path a
    ``GreenletExit`` would otherwise slip past gunicorn's ``except Exception``.
    """
    _end_request(worker.log)


def post_fork(server: Any, worker: Any) -> None:
    """gunicorn hook: fresh pools for every engine greenscope knows (see above)."""
    _after_fork()


def post_worker_init(worker: Any) -> None:
    """gunicorn hook: log what :mod:`greenscope.doctor` finds wrong; start the metrics.

    Runs the checks once per worker process, after gevent patched it and the app was
    loaded, and logs each warning and error finding through gunicorn's logger (one
    ``gc.get_objects()`` pass, once). Then starts the metrics exporters the worker is
    configured for (:mod:`greenscope.metrics`: StatsD with ``--statsd-host``, Prometheus
    with ``PROMETHEUS_MULTIPROC_DIR``). greenscope's worker classes do both by
    themselves; ``GREENSCOPE_DOCTOR=0`` and ``GREENSCOPE_METRICS=0`` turn them off.
    Never raises: a failure is logged instead.

    .. versionadded:: 0.1
    .. versionchanged:: 0.3 Starts the metrics exporters.
    """
    _run_doctor(worker)
    _start_metrics(worker)


def _start_metrics(worker: Any) -> None:
    try:
        from greenscope.metrics import _wiring  # noqa: PLC0415 - only in workers

        _wiring.worker_started(worker)
    except Exception:
        worker.log.exception("greenscope.metrics: starting the exporters failed; no metrics")


def _stop_metrics(log: Any) -> None:
    try:
        from greenscope.metrics import _wiring  # noqa: PLC0415 - only in workers

        _wiring.worker_exiting()
    except Exception:
        log.exception("greenscope.metrics: the last publish failed")


_doctor_ran = False


def _run_doctor(worker: Any) -> None:
    global _doctor_ran  # noqa: PLW0603 - once per worker process, whoever asks first
    off = os.environ.get("GREENSCOPE_DOCTOR", "").strip().lower() in {"0", "false", "no", "off"}
    if _doctor_ran or off:
        return
    _doctor_ran = True
    try:
        from greenscope import doctor  # noqa: PLC0415 - a gc pass, once per worker

        cfg = worker.cfg
        findings = doctor.diagnose(
            worker_connections=cfg.worker_connections,
            threads=cfg.threads,
            worker_class=type(worker),
            worker_timeout=cfg.timeout,
            post_request=cfg.post_request,
            app=getattr(worker, "wsgi", None),
        )
        for finding in findings:
            if finding.severity in {"warning", "error"}:
                log = worker.log.error if finding.severity == "error" else worker.log.warning
                fix = f" Fix: {finding.fix}" if finding.fix else ""
                log("greenscope doctor %s: %s.%s", finding.check, finding.message, fix)
    except Exception:
        worker.log.exception("greenscope doctor: the checks failed; skipped")


def worker_exit(server: Any, worker: Any) -> None:
    """gunicorn hook: close the Sessions left in the exiting worker; publish the metrics
    a last time.

    Sessions of requests still running (an immediate shutdown, SIGQUIT) are left to the
    database, which rolls back when the process goes: closing them would wait for
    their queries and hold up the exit. The registries stay usable
    (``shutdown=False``): your own ``worker_exit`` or ``atexit`` code may still use a
    Session, and should remove it.
    """
    greenscope.close_all(include_running=False, shutdown=False)
    _stop_metrics(getattr(worker, "log", None) or logging.getLogger("greenscope"))


class GeventWorker(ggevent.GeventWorker):  # type: ignore[misc]  # gunicorn is untyped
    """``-k gevent`` that removes each request's Sessions when the request ends."""

    def init_process(self) -> None:
        _after_fork()
        super().init_process()

    def run(self) -> None:
        _run_doctor(self)  # after patching and loading the app, before serving
        _start_metrics(self)
        try:
            super().run()
        finally:
            greenscope.close_all(include_running=False, shutdown=False)  # see worker_exit
            _stop_metrics(self.log)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            _end_request(self.log)

    def handle_http2_request(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().handle_http2_request(*args, **kwargs)
        finally:
            _end_request(self.log)


class _PyWSGIHandler(ggevent.PyWSGIHandler):  # type: ignore[misc]  # gevent is untyped
    def run_application(self) -> None:
        # gevent closes the response iterable in run_application's own finally.
        try:
            super().run_application()
        finally:
            _end_request(self.server.log)


class GeventPyWSGIWorker(GeventWorker):
    """``-k gevent_pywsgi`` (gevent's own HTTP server) with request-end removal."""

    server_class = ggevent.PyWSGIServer
    wsgi_handler = _PyWSGIHandler
