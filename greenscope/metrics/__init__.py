"""greenscope's metrics: pool trouble visible before users see it.

What is measured (see :mod:`greenscope.metrics._core` for how, and why it is safe from
the gevent hub): greenscope's counters (Sessions created, removed, reaped, failed and
timed-out closes, live Sessions, the engine guard's rescues) and, per engine, the pool's
size, checked-out and overflow connections, checkouts waiting, checkout wait time and
connection hold time (histograms), checkouts that timed out, invalidations.

Exporters, each an optional extra:

* :mod:`greenscope.metrics.prometheus`: ``prometheus_client``, correct across gunicorn's
  worker processes (its multiprocess mode), with a ``/metrics`` WSGI app;
* :mod:`greenscope.metrics.statsd`: through gunicorn's own ``--statsd-host`` logger, no
  new dependency.

Both publish from one background loop per process (:func:`start`); nothing runs on the
registry's hit path. :func:`snapshot` reads the same figures in-process, for a health
check or a test.

.. versionadded:: 0.3
"""

from greenscope.metrics._core import (
    BUCKETS,
    Collected,
    EngineSnapshot,
    HistogramSnapshot,
    Sink,
    Snapshot,
    instrument,
    publish_now,
    snapshot,
    start,
    stop,
)

__all__ = [
    "BUCKETS",
    "Collected",
    "EngineSnapshot",
    "HistogramSnapshot",
    "Sink",
    "Snapshot",
    "instrument",
    "publish_now",
    "snapshot",
    "start",
    "stop",
]
