"""greenscope's metrics for Prometheus, correct across gunicorn's worker processes.

Every gunicorn worker is a process with its own pools and counters, and a scrape reaches
one of them. prometheus_client's multiprocess mode solves that: each process writes its
values to files in ``PROMETHEUS_MULTIPROC_DIR``, and ``/metrics`` (in whichever worker
answers) adds them up. It is chosen when prometheus_client is *first imported*, so the
directory must be in the environment before anything imports it. In your
``gunicorn.conf.py``::

    from greenscope.metrics import prometheus

    prometheus.setup_multiprocess()  # first: before anything imports prometheus_client
    on_starting = prometheus.on_starting  # a fresh directory at each master start
    child_exit = prometheus.child_exit  # a dead worker's gauges leave the sums

and serve the metrics from the app::

    app = prometheus.MetricsMiddleware(app)  # GET /metrics

``greenscope.gunicorn.GeventWorker`` (or the ``greenscope.gunicorn.post_worker_init``
hook with the stock worker, or :func:`post_worker_init` here) starts publishing in every
worker; at the worker's exit it publishes a last time. Counters keep a dead worker's
counts (they never go down); gauges are summed over live workers only.

Metrics (``engine`` is the engine's label, see :func:`greenscope.metrics.instrument`):

=============================================  =========  ==============================
``greenscope_sessions_created_total``          counter    Sessions made by registries
``greenscope_sessions_removed_total``          counter    removed at request or task end
``greenscope_sessions_reaped_total``           counter    closed because their greenlet
                                                          ended first (orphans)
``greenscope_session_close_failures_total``    counter    closes that raised
``greenscope_session_close_timeouts_total``    counter    closes cut at ``close_timeout``
``greenscope_guard_rescued_total``             counter    connections rescued from the hub
``greenscope_sessions_live``                   gauge      Sessions held now
``greenscope_pool_size``                       gauge      ``pool_size``, per engine
``greenscope_pool_max_overflow``               gauge      ``max_overflow``
``greenscope_pool_checked_out``                gauge      connections checked out
``greenscope_pool_overflow``                   gauge      overflow connections open
``greenscope_pool_waiting``                    gauge      checkouts in progress (waiting)
``greenscope_pool_checkouts_total``            counter    checkouts
``greenscope_pool_checkout_timeouts_total``    counter    ``QueuePool limit ... reached``
``greenscope_pool_invalidations_total``        counter    connections invalidated
``greenscope_pool_checkout_wait_seconds``      histogram  asking for a connection to
                                                          getting it
``greenscope_pool_connection_hold_seconds``    histogram  checkout to checkin
=============================================  =========  ==============================

Values are at most one publishing interval old (5 s; ``GREENSCOPE_METRICS_INTERVAL``),
except the answering worker's own, which it publishes before each scrape.

.. versionadded:: 0.3
"""

from __future__ import annotations

import glob
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

from greenscope.metrics import _core

__all__ = [
    "MetricsMiddleware",
    "PrometheusSink",
    "child_exit",
    "metrics_app",
    "on_starting",
    "post_worker_init",
    "setup_multiprocess",
    "start",
    "worker_exit",
]

_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _prometheus_client() -> Any:
    try:
        import prometheus_client  # noqa: PLC0415 - imported late on purpose (see above)
        import prometheus_client.multiprocess  # noqa: PLC0415 - not imported by the package
    except ImportError as exc:
        raise ImportError(
            "greenscope.metrics.prometheus needs prometheus_client; install it with: "
            "pip install 'greenscope[prometheus]'"
        ) from exc
    return prometheus_client


def _multiprocess_active() -> bool:
    """Whether prometheus_client (imported) chose its multiprocess mode."""
    values = sys.modules.get("prometheus_client.values")
    value_class = getattr(values, "ValueClass", None)
    return bool(getattr(value_class, "_multiprocess", False))


def setup_multiprocess(directory: str | None = None) -> str:
    """Make sure ``PROMETHEUS_MULTIPROC_DIR`` names a directory; return it.

    Uses ``directory``, else the environment's value, else a new temporary directory,
    and sets the environment variable so that every worker gunicorn forks inherits it.
    Call it in ``gunicorn.conf.py`` before anything imports prometheus_client (gunicorn
    loads the config first, before the app even with ``--preload``). Idempotent: a
    reload (SIGHUP) runs the config again and keeps the directory and its files.

    Raises :class:`RuntimeError` when prometheus_client was already imported in
    single-process mode: each scrape would then show one worker's figures.

    .. versionadded:: 0.3
    """
    path = directory or os.environ.get(_ENV) or tempfile.mkdtemp(prefix="greenscope-prom-")
    if "prometheus_client.values" in sys.modules and not _multiprocess_active():
        raise RuntimeError(
            "greenscope.metrics.prometheus.setup_multiprocess(): prometheus_client was "
            "imported before PROMETHEUS_MULTIPROC_DIR was set, so it runs in single-process "
            "mode and each scrape would show one worker. Call setup_multiprocess() at the "
            "top of gunicorn.conf.py, before anything imports prometheus_client, or set "
            "PROMETHEUS_MULTIPROC_DIR in gunicorn's environment."
        )
    os.makedirs(path, exist_ok=True)
    os.environ[_ENV] = path
    return path


def on_starting(server: Any) -> None:
    """gunicorn hook (master, once at start): a clean multiprocess directory.

    Files left by an earlier run would add its counts to this one's.
    """
    path = setup_multiprocess()
    for stale in glob.glob(os.path.join(path, "*.db")):
        os.remove(stale)


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn hook (master): a dead worker's gauges leave the sums; counters stay."""
    path = os.environ.get(_ENV)
    if path:
        _prometheus_client().multiprocess.mark_process_dead(worker.pid, path)


class PrometheusSink:
    """Publishes each collection into prometheus_client metrics.

    One per process is made by :func:`start`; pass ``registry`` (a
    ``prometheus_client.CollectorRegistry``) to make more, for tests. Counters are fed
    the increase since the previous publish, so they never go down.
    """

    def __init__(self, registry: Any = None) -> None:
        pc = _prometheus_client()
        kw: dict[str, Any] = {} if registry is None else {"registry": registry}
        live: dict[str, Any] = {"multiprocess_mode": "livesum"}

        def counter(name: str, doc: str, labels: Iterable[str] = ()) -> Any:
            return pc.Counter(name, doc, list(labels), **kw)

        def gauge(name: str, doc: str, labels: Iterable[str] = ()) -> Any:
            return pc.Gauge(name, doc, list(labels), **kw, **live)

        def histogram(name: str, doc: str) -> Any:
            return pc.Histogram(name, doc, ["engine"], buckets=_core.BUCKETS, **kw)

        self.counters = {
            "created": counter("greenscope_sessions_created", "Sessions made by registries"),
            "removed": counter("greenscope_sessions_removed", "Sessions removed"),
            "reaped": counter(
                "greenscope_sessions_reaped", "Sessions closed after their greenlet ended"
            ),
            "failed": counter("greenscope_session_close_failures", "closes that raised"),
            "timed_out": counter(
                "greenscope_session_close_timeouts", "closes cut at close_timeout"
            ),
            "rescued": counter(
                "greenscope_guard_rescued", "connections rescued from the gevent hub"
            ),
        }
        self.live = gauge("greenscope_sessions_live", "Sessions held now")
        e = ["engine"]
        self.size = gauge("greenscope_pool_size", "pool_size of the engine's pool", e)
        self.max_overflow = gauge("greenscope_pool_max_overflow", "max_overflow of the pool", e)
        self.checked_out = gauge("greenscope_pool_checked_out", "connections checked out", e)
        self.overflow = gauge("greenscope_pool_overflow", "overflow connections open", e)
        self.waiting = gauge("greenscope_pool_waiting", "checkouts in progress", e)
        self.engine_counters = {
            "checkouts": counter("greenscope_pool_checkouts", "connection checkouts", e),
            "checkout_timeouts": counter(
                "greenscope_pool_checkout_timeouts", "checkouts that timed out", e
            ),
            "invalidations": counter(
                "greenscope_pool_invalidations", "connections invalidated", e
            ),
        }
        self.wait = histogram(
            "greenscope_pool_checkout_wait_seconds",
            "seconds from asking for to getting a connection",
        )
        self.hold = histogram(
            "greenscope_pool_connection_hold_seconds", "seconds from checkout to checkin"
        )
        self.deltas = _core.Deltas()

    def publish(self, collected: _core.Collected) -> None:
        snap = collected.snapshot
        for field, counter in self.counters.items():
            increase = self.deltas(field, getattr(snap.stats, field))
            if increase:
                counter.inc(increase)
        self.live.set(snap.stats.live)
        for engine in snap.engines:
            name = engine.name
            self.size.labels(name).set(engine.size)
            self.max_overflow.labels(name).set(engine.max_overflow)
            self.checked_out.labels(name).set(engine.checked_out)
            self.overflow.labels(name).set(engine.overflow)
            self.waiting.labels(name).set(engine.waiting)
            for field, counter in self.engine_counters.items():
                child = counter.labels(name)  # shown from the start, at 0: rate() works
                increase = self.deltas((name, field), getattr(engine, field))
                if increase:
                    child.inc(increase)
            wait, hold = self.wait.labels(name), self.hold.labels(name)
            for seconds in collected.wait_samples.get(name, ()):
                wait.observe(seconds)
            for seconds in collected.hold_samples.get(name, ()):
                hold.observe(seconds)


_sink: PrometheusSink | None = None


def start(*, interval: float | None = None) -> PrometheusSink:
    """Publish greenscope's metrics to prometheus_client from now on, in this process.

    Called by greenscope's gunicorn worker and hooks when ``PROMETHEUS_MULTIPROC_DIR``
    is set; call it yourself elsewhere (a single process needs no directory).
    Idempotent.

    .. versionadded:: 0.3
    """
    global _sink  # noqa: PLW0603 - one set per process: prometheus_client refuses duplicates
    if _sink is None:
        _sink = PrometheusSink()
    _core.start(_sink, interval=interval)
    return _sink


def post_worker_init(worker: Any) -> None:
    """gunicorn hook: start publishing in this worker (greenscope's workers need none)."""
    start(interval=_core.interval_from_env())


def worker_exit(server: Any, worker: Any) -> None:
    """gunicorn hook: publish a last time, so that this worker's last counts are kept."""
    _core.stop(final=True)


StartResponse = Callable[..., Any]


def metrics_app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """A WSGI app that answers with greenscope's (and every other) Prometheus metric.

    In multiprocess mode it adds up every worker's files, after publishing this worker's
    own latest values; otherwise it serves prometheus_client's default registry.
    """
    pc = _prometheus_client()
    _core.publish_now()
    if os.environ.get(_ENV) and _multiprocess_active():
        registry = pc.CollectorRegistry()
        pc.multiprocess.MultiProcessCollector(registry)
    else:
        registry = pc.REGISTRY
    data = pc.generate_latest(registry)
    start_response(
        "200 OK", [("Content-Type", pc.CONTENT_TYPE_LATEST), ("Content-Length", str(len(data)))]
    )
    return [data]


class MetricsMiddleware:
    """Serve :func:`metrics_app` at ``path`` (default ``/metrics``); pass the rest on.

    Put it outside :class:`greenscope.wsgi.GreenscopeMiddleware` or any auth you need:
    a scrape uses no database.
    """

    def __init__(self, app: Callable[..., Iterable[bytes]], path: str = "/metrics") -> None:
        if not callable(app):
            raise TypeError(f"MetricsMiddleware(app) takes a WSGI app; got {app!r}")
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(
                f"MetricsMiddleware(app, path=...) takes a path like '/metrics'; got {path!r}"
            )
        self.app = app
        self.path = path

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == self.path:
            return metrics_app(environ, start_response)
        return self.app(environ, start_response)
