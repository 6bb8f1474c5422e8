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
``max-connections``         ``workers x (pool_size + max_overflow)`` fits the database's
                            ``max_connections`` (asked only with ``connect=True``)
``known-engines``           greenscope knows each engine (fresh pools after fork)
``engine-guard``            each engine's reset is kept out of the gevent hub
``gc``                      when automatic garbage collections run
``stock-scoped-session``    SQLAlchemy scoped_sessions shared by every greenlet
``request-end-removal``     something removes each request's Sessions when it ends
``celery-install``          a Celery worker removes each task's Sessions
``celery-soft-time-limit``  the gevent pool ignores ``soft_time_limit``
==========================  ===========================================================

Three ways in:

* ``python -m greenscope doctor [--app] module:app [-c FILE] [--connect]`` (see
  :mod:`greenscope.__main__`): imports the app the way a gunicorn worker would, then
  reports. Exit status 1 on an ``error`` (with ``--strict`` also on a ``warning``).
* :func:`greenscope.gunicorn.post_worker_init`, a gunicorn hook, and greenscope's worker
  classes, which run the checks once at worker start and log warnings and errors
  (``GREENSCOPE_DOCTOR=0`` turns that off).
* :func:`diagnose`, for your own health checks and tests.

The checks live in one private module per family (``_gevent``, ``_pools``,
``_registries``, ``_servers``, ``_celery``), registered with ``_framework.register``
under their id, and run in the order of :data:`CHECKS`.

Not guaranteed: engines and registries created after the checks ran (lazily, at the
first request) are not seen; a ``post_request`` hook of your own is only inspected for a
reference to greenscope's, not run; other clients of a database are not counted
against its ``max_connections``.

.. versionadded:: 0.1
.. versionchanged:: 0.2 A package; the ``max-connections`` check.
"""

from __future__ import annotations

# Importing the family modules registers their checks; the order of the report is
# CHECKS, not this import order.
from greenscope.doctor import (  # noqa: F401 - imported to register the checks
    _celery,
    _gevent,
    _pools,
    _registries,
    _servers,
)
from greenscope.doctor._framework import (
    CHECKS,
    Finding,
    Severity,
    diagnose,
    exit_status,
    report,
    summary,
    to_json,
)

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
