"""A Celery app for the tests: tasks that write, forget, raise and retry, and report.

Configured from the environment by tests/test_celery.py: ``GS_BROKER``, ``GS_BACKEND``,
``GS_DB``, ``GS_TABLE``, ``GS_QUEUE``, ``GS_REPORT`` (a directory), ``GS_COMMIT`` ("1":
commit_on_success) and ``GS_STOCK`` ("1": SQLAlchemy's own scoped_session and no
greenscope, the control).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from celery import Celery, signals
from sqlalchemy import create_engine, text
from sqlalchemy.orm import scoped_session as stock_scoped_session
from sqlalchemy.orm import sessionmaker

import greenscope
import greenscope.celery

app = Celery("greenscope_tests", broker=os.environ["GS_BROKER"], backend=os.environ["GS_BACKEND"])
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=4,
    broker_transport_options={"polling_interval": 0.05},  # Redis: no 1-2 s waits
    broker_connection_retry_on_startup=True,
    task_default_queue=os.environ["GS_QUEUE"],
    worker_hijack_root_logger=False,
)
TABLE = os.environ["GS_TABLE"]
STOCK = os.environ.get("GS_STOCK") == "1"
engine = create_engine(
    os.environ["GS_DB"],
    pool_size=10,
    max_overflow=0,
    pool_timeout=10,
    connect_args={"application_name": os.environ["GS_QUEUE"]},
)
factory = sessionmaker(engine)
Session: Any = stock_scoped_session(factory) if STOCK else greenscope.scoped_session(factory)
if not STOCK:
    greenscope.celery.install(app, commit_on_success=os.environ.get("GS_COMMIT") == "1")


class _Orphans(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "left open by" in record.getMessage():
            self.count += 1


orphans = _Orphans()
logging.getLogger("greenscope").addHandler(orphans)


@app.task(bind=True)  # type: ignore[untyped-decorator]  # Celery is untyped
def write(self: Any, key: str, mode: str) -> bool:
    """Write ``key``; then commit, forget, raise or retry. Returns whether it saw a
    Session another task had used (its identity map, info or transaction)."""
    session = Session()
    foreign = bool(session.info.get("task")) or session.in_transaction()
    session.info["task"] = key
    Session.execute(text(f"INSERT INTO {TABLE} (owner) VALUES (:k)"), {"k": key})
    if mode == "commit":
        Session.commit()
    elif mode == "raise":
        raise RuntimeError(f"task {key} fails")
    elif mode == "retry" and self.request.retries == 0:
        raise self.retry(countdown=0, max_retries=1)
    elif mode == "retry":
        Session.commit()
    elif mode == "hang":  # past its time_limit, or revoked: killed mid-transaction
        time.sleep(30)
    elif mode == "deferred":  # its COMMIT will fail: a deferred foreign key is violated
        Session.execute(text(f"INSERT INTO {TABLE}_child (parent) VALUES (-1)"))
    return foreign


def _report(**kwargs: Any) -> None:
    from greenscope import _cleanup, _registry  # noqa: PLC0415 - diagnostics

    reaped = greenscope.wait_reaped(5)
    stats = greenscope.stats()
    path = os.path.join(os.environ["GS_REPORT"], f"{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump(
            {
                "created": stats.created,
                "removed": stats.removed,
                "reaped": stats.reaped,
                "live": stats.live,
                "orphan_warnings": orphans.count,
                "checked_out": engine.pool.checkedout(),  # type: ignore[attr-defined]
                "wait_reaped": reaped,
                "pending": _cleanup.pending(),
                "death_pending": _registry._death_pending(),
            },
            f,
        )


# After greenscope's own handlers (connected at install()): what is left at exit.
signals.worker_process_shutdown.connect(_report, weak=False)
signals.worker_shutdown.connect(_report, weak=False)
