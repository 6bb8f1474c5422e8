"""Delete expired HTTP sessions now and then: a background greenlet in each worker.

greenscope.sessions never returns an expired session, but its row stays until something
deletes it. Pick one of these, not all:

* a background greenlet, started in every gunicorn worker by this module's
  ``post_worker_init`` (below): each worker sweeps every ``interval`` seconds, jittered
  so that workers rarely sweep together; deleting is idempotent, so an overlap loses
  nothing on PostgreSQL. On MariaDB, overlapping sweeps were seen to deadlock each other
  and the requests' saves (error 1213): there, prefer one sweeper (beat or cron);
* a Celery beat task (``celery_beat_schedule`` below), if you run Celery;
* cron: ``python -c 'from myapp import store; print(store.delete_expired())'``.

In ``gunicorn.conf.py``::

    from sessions_cleanup import sweep_in_background

    def post_worker_init(worker):
        from myapp import store  # your SQLAlchemyStore
        sweep_in_background(store, interval=600)
"""

from __future__ import annotations

import logging
import random
from typing import Any

import gevent

from greenscope.sessions import SQLAlchemyStore

logger = logging.getLogger("greenscope")


def sweep_in_background(store: SQLAlchemyStore[Any], *, interval: float = 600.0) -> Any:
    """Start a greenlet that calls ``store.delete_expired()`` every ``interval`` seconds.

    Each call runs in the store's own Session, on its own pooled connection, and commits
    its own transaction (see greenscope.sessions). A failure is logged and the next sweep
    tries again. Returns the greenlet (``kill()`` it to stop).
    """

    def loop() -> None:
        gevent.sleep(random.uniform(0, interval))  # jitter: workers do not sweep together
        while True:
            try:
                deleted = store.delete_expired()
                if deleted:
                    logger.info("greenscope.sessions: deleted %d expired sessions", deleted)
            except Exception:
                logger.exception("greenscope.sessions: deleting expired sessions failed")
            gevent.sleep(interval)

    return gevent.spawn(loop)


def celery_beat_schedule(task_name: str, *, every_seconds: float = 600.0) -> dict[str, Any]:
    """A ``beat_schedule`` entry for a task of yours that calls ``store.delete_expired()``::

    @app.task(name="sessions.delete_expired")
    def delete_expired_sessions() -> int:
        return store.delete_expired()

    app.conf.beat_schedule = celery_beat_schedule("sessions.delete_expired")
    """
    return {"delete-expired-sessions": {"task": task_name, "schedule": every_seconds}}
