"""The Celery app ``make soak-celery`` runs under a real worker (see deploy/soak_celery.py).

Configured from the environment: ``SOAK_BROKER``, ``SOAK_BACKEND``, ``SOAK_DB``,
``SOAK_TAG`` (table, queue and ``application_name``), ``SOAK_REPORT`` (a directory) and
``SOAK_STOCK`` ("1": SQLAlchemy's own ``scoped_session`` and no greenscope: the control).

Every write is keyed by a unique key (``INSERT ... ON CONFLICT DO NOTHING`` on a primary
key), so a task redelivered under ``acks_late`` cannot store its write twice.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import gevent
from celery import Celery, signals
from sqlalchemy import create_engine, text
from sqlalchemy.orm import scoped_session as stock_scoped_session
from sqlalchemy.orm import sessionmaker

import greenscope
import greenscope.celery

TAG = os.environ["SOAK_TAG"]
STOCK = os.environ.get("SOAK_STOCK") == "1"

app = Celery(
    "celery_soak_app", broker=os.environ["SOAK_BROKER"], backend=os.environ["SOAK_BACKEND"]
)
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue=TAG,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"polling_interval": 0.05},
    worker_hijack_root_logger=False,
    result_expires=3600,
)
engine = create_engine(
    os.environ["SOAK_DB"],
    pool_size=10,
    max_overflow=10,
    pool_timeout=10,
    connect_args={"application_name": TAG},
)
factory = sessionmaker(engine)
if STOCK:
    Session: Any = stock_scoped_session(factory)
    Background: Any = stock_scoped_session(factory)
else:
    Session = greenscope.scoped_session(factory)
    Background = greenscope.scoped_session(factory)  # its own counters: orphans expected
    greenscope.celery.install(app)

INSERT = text(f"INSERT INTO {TAG} (key, task) VALUES (:k, :t) ON CONFLICT (key) DO NOTHING")


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.orphans = 0
        self.reset_errors = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.orphans += "left open by" in message
        self.reset_errors += "Exception during reset" in message


seen = _Warnings()
logging.getLogger("greenscope").addHandler(seen)
logging.getLogger("sqlalchemy.pool").addHandler(seen)


def _background(key: str) -> None:
    Background.execute(INSERT, {"k": key, "t": "background"})  # never committed: an orphan


@app.task(bind=True)  # type: ignore[untyped-decorator]  # Celery is untyped
def job(self: Any, key: str, mode: str) -> bool:
    """Write ``key``, then act out ``mode``; return whether a foreign Session was seen."""
    session = Session()
    foreign = (
        bool(session.info.get("key")) or session.in_transaction() or bool(session.identity_map)
    )
    session.info["key"] = key
    Session.execute(INSERT, {"k": key, "t": mode})
    gevent.sleep(0.02)  # idle in transaction for a moment: pg_terminate_backend's window
    if mode == "commit":
        Session.commit()
    elif mode == "raise":
        raise RuntimeError("the task fails after writing")
    elif mode == "retry":
        if self.request.retries == 0:
            raise self.retry(countdown=0, max_retries=1)
        Session.commit()
    elif mode == "timeout":
        try:
            with gevent.Timeout(0.05):  # an in-task timeout cuts a query short
                Session.execute(text("SELECT pg_sleep(1)"))
        except gevent.Timeout:
            # Re-raised as an Exception: Celery records no state at all for a task that
            # raises a BaseException such as gevent.Timeout (it never finishes).
            raise TimeoutError("the query took too long") from None
    elif mode == "hang":
        time.sleep(30)  # killed by the hard time_limit the soak sends with it
    elif mode == "background":
        gevent.spawn(_background, key + "-bg").join()
        Session.commit()
    # mode "forget": returns without committing
    return foreign


def _counters(scoped: Any) -> dict[str, int]:
    registry = scoped.registry
    if not isinstance(registry, greenscope.GreenletRegistry):
        return {}
    s = registry.stats()
    return {"created": s.created, "removed": s.removed, "reaped": s.reaped, "live": s.live}


@app.task  # type: ignore[untyped-decorator]  # Celery is untyped
def report() -> dict[str, Any]:
    """What the worker holds now (sent when the batch is done and the worker idles)."""
    greenscope.wait_reaped(5)
    return {
        "checked_out": engine.pool.checkedout(),  # type: ignore[attr-defined]
        "task_sessions": _counters(Session),
        "background_sessions": _counters(Background),
        "orphan_warnings": seen.orphans,
        "reset_errors": seen.reset_errors,
    }


def _at_exit(**kwargs: Any) -> None:
    greenscope.wait_reaped(5)
    path = os.path.join(os.environ["SOAK_REPORT"], f"{os.getpid()}-{time.monotonic_ns()}.json")
    with open(path, "w") as f:
        json.dump(report(), f)


signals.worker_shutdown.connect(_at_exit, weak=False)
