"""What greenscope measures, kept where a pool event can afford it; exporters read it later.

Data flow, one way::

    pool events (checkout, checkin, invalidate)  -->  _EngineMetrics of the engine:
    the pool's connect(), wrapped (wait time)         plain ints, bucket counts and a
                                                      bounded list of raw samples
                                                             |
    greenscope.stats() (registries, guard)  ------------->  collect(): a Snapshot, and
                                                             the samples since last time
                                                             |
                                      a publisher greenlet/thread, every ``interval``
                                                             |
                                      sinks: prometheus_client (multiprocess), StatsD

Why the indirection: a check-in can happen in the gevent hub or inside a garbage
collection pass that interrupted *any* code, an exporter's included. prometheus_client
takes a lock in every ``inc()``/``observe()``; taken again from a GC pass on the same
greenlet it would deadlock, and in the hub it cannot wait at all (gevent#1937 is the
same hazard for I/O). So pool events only do arithmetic on plain Python objects (no
lock, no I/O, no logging), and everything that locks or sends runs in the publisher.

Invariants and what is not guaranteed:

* The registry hit path is untouched: nothing here runs on ``Session()`` or a proxied
  call. Per checkout the cost is the wrapper around ``connect()`` and two listeners.
* Counts and sums are exact under the GIL (single-bytecode updates on ints and list
  items, as in :mod:`greenscope._cleanup`); approximate on free-threaded builds.
* Raw samples (for exporters that need each observation) are kept up to
  ``_MAX_SAMPLES`` per engine between two publishes; beyond that they are dropped and
  counted (``samples_dropped``), while counts, sums and buckets stay exact.
* Engines are held weakly. An engine that is garbage collected disappears from the
  snapshot; the counters exporters publish never go down (see :class:`Deltas`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import sqlalchemy.exc
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool, QueuePool

from greenscope import _engines, _registry

__all__ = [
    "BUCKETS",
    "Collected",
    "EngineSnapshot",
    "HistogramSnapshot",
    "Sink",
    "Snapshot",
    "collect",
    "instrument",
    "interval_from_env",
    "publish_now",
    "sinks",
    "snapshot",
    "start",
    "stop",
]

logger = logging.getLogger("greenscope")

# Seconds. Checkout waits are usually under a millisecond and, when the pool is
# exhausted, end at pool_timeout (30 s by default); hold times span a query to a slow
# request. One set for both, so that dashboards can compare them bucket by bucket.
BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    float("inf"),
)

_MAX_SAMPLES = 20_000  # raw samples kept per engine and histogram between two publishes
_CHECKED_OUT_AT = "greenscope.metrics.checked_out_at"  # in the pool record's .info


class _Histogram:
    """Exact bucket counts and sum, plus the raw samples not yet handed to an exporter."""

    __slots__ = ("buckets", "count", "dropped", "samples", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * len(BUCKETS)
        self.count = 0
        self.sum = 0.0
        self.samples: list[float] = []
        self.dropped = 0

    def observe(self, seconds: float) -> None:  # any context: arithmetic only
        self.buckets[bisect_left(BUCKETS, seconds)] += 1
        self.count += 1
        self.sum += seconds
        if len(self.samples) < _MAX_SAMPLES:
            self.samples.append(seconds)
        else:
            self.dropped += 1

    def take_samples(self) -> list[float]:
        samples, self.samples = self.samples, []
        return samples

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(tuple(self.buckets), self.count, self.sum)


@dataclass(frozen=True)
class HistogramSnapshot:
    """A histogram at one moment: counts per bucket of ``BUCKETS`` (not cumulative:
    ``buckets[i]`` counts observations in ``(BUCKETS[i-1], BUCKETS[i]]``), total count
    and sum in seconds."""

    buckets: tuple[int, ...] = ()
    count: int = 0
    sum: float = 0.0


@dataclass(frozen=True)
class EngineSnapshot:
    """One engine's pool at one moment, and what greenscope counted on it.

    ``size``, ``max_overflow``, ``checked_out`` and ``overflow`` are the pool's own
    (``QueuePool``; other pools report 0 for all but ``checked_out``): the pool holds up
    to ``size + max_overflow`` connections. ``waiting``: greenlets and threads inside
    a checkout right now, most of them waiting for a connection when the pool is full.
    ``checkout_timeouts``: checkouts that gave up at ``pool_timeout`` (the ``QueuePool
    limit ... reached`` error). ``checkout_wait`` and ``hold``: seconds from asking for a
    connection to getting it, and from getting it to giving it back (one observation per
    checkout: a request that commits twice holds a connection twice).
    """

    name: str
    size: int
    max_overflow: int
    checked_out: int
    overflow: int
    waiting: int
    checkouts: int
    checkout_timeouts: int
    invalidations: int
    checkout_wait: HistogramSnapshot
    hold: HistogramSnapshot


@dataclass(frozen=True)
class Snapshot:
    """greenscope's counters (:func:`greenscope.stats`) and every instrumented engine."""

    stats: _registry.RegistryStats
    engines: tuple[EngineSnapshot, ...]
    samples_dropped: int = 0


class _EngineMetrics:
    """The counters of one engine, updated from pool events (see the module docstring)."""

    __slots__ = (
        "__weakref__",
        "checkout_timeouts",
        "checkouts",
        "engine",
        "hold",
        "invalidations",
        "name",
        "wait",
        "waiting",
    )

    def __init__(self, engine: Engine, name: str) -> None:
        self.engine = weakref.ref(engine)
        self.name = name
        self.checkouts = 0
        self.checkout_timeouts = 0
        self.invalidations = 0
        self.waiting = 0
        self.wait = _Histogram()
        self.hold = _Histogram()

    # -- pool events: arithmetic only (they may run in the hub or inside a GC pass) --------

    def on_checkout(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        self.checkouts += 1
        record.info[_CHECKED_OUT_AT] = time.perf_counter()

    def on_checkin(self, dbapi_connection: Any, record: Any) -> None:
        started = record.info.pop(_CHECKED_OUT_AT, None) if record is not None else None
        if started is not None:
            self.hold.observe(time.perf_counter() - started)

    def on_invalidate(self, dbapi_connection: Any, record: Any, exception: Any) -> None:
        self.invalidations += 1

    def wrap(self, pool: Pool) -> None:
        """Time ``pool.connect()``: no pool event fires when a checkout *starts*."""
        original = pool.connect
        if getattr(original, "_greenscope_metrics", None) is self:
            return
        metrics = self
        clock = time.perf_counter

        def connect() -> Any:
            metrics.waiting += 1
            started = clock()
            try:
                return original()
            except sqlalchemy.exc.TimeoutError:
                metrics.checkout_timeouts += 1
                raise
            finally:
                metrics.waiting -= 1
                metrics.wait.observe(clock() - started)

        connect._greenscope_metrics = self  # type: ignore[attr-defined]  # a marker
        pool.connect = connect  # type: ignore[method-assign]  # this pool only

    def on_disposed(self, engine: Engine) -> None:
        self.wrap(engine.pool)  # dispose() made a new pool: time it too

    def snapshot(self) -> EngineSnapshot | None:
        engine = self.engine()
        if engine is None:
            return None
        pool = engine.pool
        if isinstance(pool, QueuePool):
            size, checked_out, overflow = pool.size(), pool.checkedout(), max(0, pool.overflow())
            max_overflow = max(0, pool._max_overflow)  # no public accessor; -1: unlimited
        else:
            size, checked_out, overflow = 0, getattr(pool, "checkedout", lambda: 0)(), 0
            max_overflow = 0
        return EngineSnapshot(
            self.name,
            size,
            max_overflow,
            checked_out,
            overflow,
            self.waiting,
            self.checkouts,
            self.checkout_timeouts,
            self.invalidations,
            self.wait.snapshot(),
            self.hold.snapshot(),
        )


_instrumented: weakref.WeakKeyDictionary[Engine, _EngineMetrics] = weakref.WeakKeyDictionary()
_lock = threading.Lock()  # instrument() only: ordinary code, never a pool event


def _default_name(engine: Engine) -> str:
    url = engine.url
    return f"{url.get_backend_name()}:{url.host or ''}/{url.database or ''}"


def instrument(engine: Any, *, name: str | None = None) -> Engine:
    """Measure ``engine``'s pool for greenscope's metrics; return the engine.

    Exporters instrument every engine greenscope knows (:func:`greenscope.register_engine`,
    the engines behind its registries) when they publish, so calling this is only needed
    to choose the ``engine`` label (default ``backend:host/database``, no password) or for
    an engine greenscope does not know. Idempotent: a second call only renames. Labels
    have bounded cardinality: one per engine, never per greenlet or request.

    .. versionadded:: 0.3
    """
    if not isinstance(engine, Engine):
        sync = getattr(engine, "sync_engine", None)
        hint = (
            f" For an AsyncEngine pass {type(engine).__name__}.sync_engine."
            if isinstance(sync, Engine)
            else ""
        )
        raise TypeError(
            "greenscope.metrics.instrument(engine) takes an Engine made by "
            f"sqlalchemy.create_engine(); got {engine!r}.{hint}"
        )
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(
            f"greenscope.metrics.instrument(engine, name=...) takes a non-empty str; got {name!r}"
        )
    with _lock:
        metrics = _instrumented.get(engine)
        if metrics is None:
            metrics = _EngineMetrics(engine, name or _default_name(engine))
            event.listen(engine, "checkout", metrics.on_checkout)
            event.listen(engine, "checkin", metrics.on_checkin)
            event.listen(engine, "invalidate", metrics.on_invalidate)
            event.listen(engine, "soft_invalidate", metrics.on_invalidate)
            event.listen(engine, "engine_disposed", metrics.on_disposed)
            metrics.wrap(engine.pool)
            _instrumented[engine] = metrics
        elif name is not None:
            metrics.name = name
    return engine


def _engines_metrics() -> Iterator[_EngineMetrics]:
    for engine in _engines.known_engines():
        if engine not in _instrumented:
            instrument(engine)
    yield from list(_instrumented.values())


def snapshot() -> Snapshot:
    """greenscope's counters and every instrumented engine, now.

    Instruments the engines greenscope knows on the way (ordinary code only: not from a
    hub or GC callback). Cheap: no I/O, a few attribute reads per engine.

    .. versionadded:: 0.3
    """
    return collect().snapshot


@dataclass
class Collected:
    """What a publisher hands its sinks each time: a snapshot, and the raw samples
    observed since the previous collection, per engine name."""

    snapshot: Snapshot
    wait_samples: dict[str, list[float]] = field(default_factory=dict)
    hold_samples: dict[str, list[float]] = field(default_factory=dict)


def collect() -> Collected:
    """A snapshot, and the samples since the last call (which are handed out once).

    Engines that share a label (two engines on one database, with the default label)
    are added up under it: a label is one time series, whatever made it.
    """
    by_name: dict[str, list[EngineSnapshot]] = {}
    waits: dict[str, list[float]] = {}
    holds: dict[str, list[float]] = {}
    dropped = 0
    for metrics in _engines_metrics():
        engine = metrics.snapshot()
        if engine is None:
            continue
        by_name.setdefault(engine.name, []).append(engine)
        waits.setdefault(engine.name, []).extend(metrics.wait.take_samples())
        holds.setdefault(engine.name, []).extend(metrics.hold.take_samples())
        dropped += metrics.wait.dropped + metrics.hold.dropped
    engines = tuple(_add_up(name, group) for name, group in by_name.items())
    return Collected(Snapshot(_registry.stats(), engines, dropped), waits, holds)


def _add_up(name: str, group: list[EngineSnapshot]) -> EngineSnapshot:
    if len(group) == 1:
        return group[0]

    def hist(which: str) -> HistogramSnapshot:
        parts: list[HistogramSnapshot] = [getattr(e, which) for e in group]
        buckets = tuple(sum(b) for b in zip(*(p.buckets for p in parts), strict=True))
        return HistogramSnapshot(buckets, sum(p.count for p in parts), sum(p.sum for p in parts))

    total = {
        f: sum(getattr(e, f) for e in group)
        for f in (
            "size",
            "max_overflow",
            "checked_out",
            "overflow",
            "waiting",
            "checkouts",
            "checkout_timeouts",
            "invalidations",
        )
    }
    return EngineSnapshot(name, **total, checkout_wait=hist("checkout_wait"), hold=hist("hold"))


# -- publishing ---------------------------------------------------------------------------


class Sink(Protocol):
    """An exporter: gets every collection, in the publisher's context (may lock or send)."""

    def publish(self, collected: Collected) -> None: ...


class Deltas:
    """Turns totals into increments for counters that must never go down.

    A registry or an engine that is garbage collected takes its counts out of the
    totals; the counter then stays where it was instead of going backwards.
    """

    def __init__(self) -> None:
        self._last: dict[Any, float] = {}

    def __call__(self, key: Any, total: float) -> float:
        last = self._last.get(key, 0)
        self._last[key] = total
        return total - last if total > last else 0


class _Publisher:
    """One background loop per process: collect every ``interval`` seconds, feed the sinks.

    Made by :func:`start`, with ``threading`` as it is *then*: after
    ``gevent.monkey.patch_all()`` the loop is a greenlet of the worker's hub and waits on
    a gevent event, which is what a gevent worker wants (sinks may use gevent sockets);
    without gevent it is a daemon OS thread. Made earlier (at import, before patching),
    a real ``threading.Event`` would block the whole hub while it waits. A sink that
    raises is logged (once per distinct error) and keeps its place.
    """

    def __init__(self, interval: float) -> None:
        self.sinks: list[Sink] = []
        self.interval = interval
        self.pid = os.getpid()
        self.wake = threading.Event()
        self.publish_lock = threading.Lock()
        self.stopped = False
        self.logged: set[str] = set()
        self.thread = threading.Thread(target=self.run, name="greenscope-metrics", daemon=True)

    def publish(self) -> None:
        with self.publish_lock:  # a scrape and the loop may publish at once
            collected = collect()
            for sink in list(self.sinks):
                try:
                    sink.publish(collected)
                except Exception as exc:
                    what = f"{type(sink).__name__}: {exc!r}"
                    if what not in self.logged:
                        self.logged.add(what)
                        logger.exception("greenscope.metrics: publishing to %s failed", what)

    def run(self) -> None:
        while True:
            self.wake.wait(self.interval)
            if self.stopped:  # set by stop(), which also sets the event
                return
            self.publish()


_publisher: _Publisher | None = None
DEFAULT_INTERVAL = 5.0


def interval_from_env() -> float | None:
    """``GREENSCOPE_METRICS_INTERVAL`` in seconds, or None when unset."""
    raw = os.environ.get("GREENSCOPE_METRICS_INTERVAL", "").strip()
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ValueError(
            f"GREENSCOPE_METRICS_INTERVAL must be a number of seconds > 0; got {raw!r}"
        )
    return seconds


def _current() -> _Publisher | None:
    """The publisher of this process; None before start() and in a forked child."""
    if _publisher is not None and _publisher.pid == os.getpid():
        return _publisher
    return None


def start(sink: Sink, *, interval: float | None = None) -> None:
    """Publish greenscope's metrics to ``sink`` every ``interval`` seconds (default 5).

    Starts the process's publisher on first use: one per process (a forked child starts
    its own, with no sinks), in a greenlet when gevent has patched ``threading``, else in a
    daemon thread. Call it after gevent patched (the gunicorn integrations do, at worker
    start). Sinks accumulate: Prometheus and StatsD can run side by side.

    .. versionadded:: 0.3
    """
    global _publisher  # noqa: PLW0603 - one publisher per process
    if interval is not None and (
        isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval <= 0
    ):
        raise ValueError(
            f"greenscope.metrics.start(sink, interval=...) takes seconds > 0; got {interval!r}"
        )
    publisher = _current()
    if publisher is None:
        publisher = _publisher = _Publisher(
            float(interval) if interval is not None else DEFAULT_INTERVAL
        )
        publisher.thread.start()
    elif interval is not None:
        publisher.interval = float(interval)
    if sink not in publisher.sinks:
        publisher.sinks.append(sink)


def publish_now() -> None:
    """Collect and publish to every sink now (a scrape, a worker's exit, a test).

    .. versionadded:: 0.3
    """
    publisher = _current()
    if publisher is not None:
        publisher.publish()


def stop(*, final: bool = True) -> None:
    """Stop the publisher and forget its sinks; with ``final``, publish once more first
    (at worker exit, so that a worker's last counts are not lost).

    .. versionadded:: 0.3
    """
    global _publisher  # noqa: PLW0603 - one publisher per process
    publisher = _current()
    if publisher is None:
        return
    if final:
        publisher.publish()
    publisher.stopped = True
    publisher.wake.set()
    _publisher = None


def sinks() -> list[Sink]:
    """The sinks of this process's publisher."""
    publisher = _current()
    return list(publisher.sinks) if publisher is not None else []
