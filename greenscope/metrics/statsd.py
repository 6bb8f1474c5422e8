"""greenscope's metrics through gunicorn's own StatsD logger: no new dependency.

Run gunicorn with ``--statsd-host HOST:PORT`` (and ``--statsd-prefix`` if you like):
gunicorn then logs through its ``Statsd`` logger, which can also send metrics, and
greenscope's worker (``greenscope.gunicorn.GeventWorker``, or the
``greenscope.gunicorn.post_worker_init`` hook with the stock worker) publishes through
it from every worker process. StatsD adds up what the workers send, so nothing needs
sharing between them.

Names, after gunicorn's prefix (``<engine>`` is the engine's label with every character
outside ``[A-Za-z0-9_-]`` replaced by ``_``):

* counters (increments, which StatsD adds up over workers): ``greenscope.sessions.created``,
  ``.removed``, ``.reaped``, ``.close_failures``, ``.close_timeouts``,
  ``greenscope.guard.rescued``, and ``greenscope.pool.<engine>.checkouts``,
  ``.checkout_timeouts``, ``.invalidations``;
* gauges (this worker's): ``greenscope.sessions.live``, ``greenscope.pool.<engine>.size``,
  ``.max_overflow``, ``.checked_out``, ``.overflow``, ``.waiting``;
* timers, in milliseconds: ``greenscope.pool.<engine>.checkout_wait`` and ``.hold``.

Gauges are per worker (StatsD keeps the last value it got for a name): give each host or
worker its own ``--statsd-prefix`` to keep them apart, or read the counters, which add up.

.. versionadded:: 0.3
"""

from __future__ import annotations

import re
from typing import Any, Protocol

from greenscope.metrics import _core

__all__ = ["StatsdClient", "StatsdSink", "post_worker_init", "start"]


class StatsdClient(Protocol):
    """What greenscope uses of a StatsD client: gunicorn's ``Statsd`` logger has it."""

    def gauge(self, name: str, value: float) -> None: ...

    def increment(self, name: str, value: float, sampling_rate: float = 1.0) -> None: ...


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")

_COUNTERS = {
    "created": "sessions.created",
    "removed": "sessions.removed",
    "reaped": "sessions.reaped",
    "failed": "sessions.close_failures",
    "timed_out": "sessions.close_timeouts",
    "rescued": "guard.rescued",
}


class StatsdSink:
    """Sends each collection through a StatsD client (gunicorn's logger, or any with
    ``gauge``, ``increment`` and ``timer`` or ``histogram`` in milliseconds)."""

    def __init__(self, client: Any, prefix: str = "greenscope.") -> None:
        if not callable(getattr(client, "gauge", None)) or not callable(
            getattr(client, "increment", None)
        ):
            raise TypeError(
                "greenscope.metrics.statsd.StatsdSink(client) takes a StatsD client with "
                "gauge() and increment() (gunicorn's Statsd logger, with --statsd-host); "
                f"got {client!r}"
            )
        self.client = client
        self.prefix = prefix
        # gunicorn 23's "histogram" is a timer ("|ms"); from gunicorn 24 on, timer() is.
        self.timer = getattr(client, "timer", None) or client.histogram
        self.deltas = _core.Deltas()

    def publish(self, collected: _core.Collected) -> None:
        c, p = self.client, self.prefix
        snap = collected.snapshot
        for field, name in _COUNTERS.items():
            increase = self.deltas(field, getattr(snap.stats, field))
            if increase:
                c.increment(p + name, increase)
        c.gauge(p + "sessions.live", snap.stats.live)
        for engine in snap.engines:
            base = f"{p}pool.{_UNSAFE.sub('_', engine.name)}."
            c.gauge(base + "size", engine.size)
            c.gauge(base + "max_overflow", engine.max_overflow)
            c.gauge(base + "checked_out", engine.checked_out)
            c.gauge(base + "overflow", engine.overflow)
            c.gauge(base + "waiting", engine.waiting)
            for field in ("checkouts", "checkout_timeouts", "invalidations"):
                increase = self.deltas((engine.name, field), getattr(engine, field))
                if increase:
                    c.increment(base + field, increase)
            for seconds in collected.wait_samples.get(engine.name, ()):
                self.timer(base + "checkout_wait", round(seconds * 1000, 3))
            for seconds in collected.hold_samples.get(engine.name, ()):
                self.timer(base + "hold", round(seconds * 1000, 3))


def is_statsd_logger(log: Any) -> bool:
    """Whether ``log`` is gunicorn's StatsD logger (gunicorn ran with --statsd-host)."""
    return any(cls.__module__ == "gunicorn.instrument.statsd" for cls in type(log).__mro__)


def start(client: Any, *, interval: float | None = None) -> StatsdSink:
    """Publish greenscope's metrics through ``client`` from now on, in this process.

    .. versionadded:: 0.3
    """
    for sink in _core.sinks():
        if isinstance(sink, StatsdSink) and sink.client is client:
            return sink
    sink = StatsdSink(client)
    _core.start(sink, interval=interval)
    return sink


def post_worker_init(worker: Any) -> None:
    """gunicorn hook: publish through the worker's StatsD logger, if gunicorn has one."""
    if is_statsd_logger(worker.log):
        start(worker.log, interval=_core.interval_from_env())
