"""An example Celery service with greenscope: one Session per task, removed when it ends.

Run a worker (gevent pool, 100 tasks at once, next to a gunicorn web tier)::

    DATABASE_URL=postgresql+psycopg://user@host/db \\
    CELERY_BROKER_URL=amqp://guest:guest@127.0.0.1:5672// \\
        celery -A celery_app worker -P gevent -c 100 --workdir deploy

and send work from anywhere: ``celery_app.record.delay("key-1", "some text")``.

What greenscope does here, in one line (``greenscope.celery.install``):

* each task's Session is removed when the task ends (success, failure, retry, revoke,
  the hard time limit): its transaction is rolled back unless the task committed, and
  its connection goes back to the pool before the next task can start;
* ``commit_on_success=True``: a task that returns is committed *before* Celery records
  SUCCESS, so a failing commit fails (and, with ``autoretry_for``, retries) the task;
* with ``-P prefork``, ``threads`` or ``solo`` no task inherits another's Session;
* forked prefork children get fresh pools.

The pool covers the worker's concurrency: ``-c 100`` tasks may each hold a connection.
With ``-P gevent`` psycopg must be imported after gevent patched the process: Celery
patches before it imports this module, so create engines here, not in code Celery
imports earlier (a ``celeryconfig`` that imports your models).

The gevent pool ignores ``soft_time_limit``: bound waits with ``gevent.Timeout`` in the
task, or set the hard ``time_limit``.
"""

from __future__ import annotations

import os

from celery import Celery
from sqlalchemy import String, create_engine, insert
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import greenscope
import greenscope.celery

app = Celery(
    "celery_app",
    broker=os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
)
app.conf.update(
    task_acks_late=True,  # a task lost with its worker runs again...
    worker_prefetch_multiplier=1,
)

engine = create_engine(
    os.environ.get("DATABASE_URL", "sqlite:///celery_app.db"),
    pool_size=50,
    max_overflow=50,  # -c 100
    pool_pre_ping=True,
)
Session = greenscope.scoped_session(sessionmaker(engine))
greenscope.celery.install(app, commit_on_success=True)


class Base(DeclarativeBase):
    pass


class Record(Base):
    __tablename__ = "celery_records"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    text: Mapped[str] = mapped_column(String(1000))


Base.metadata.create_all(engine)


@app.task(autoretry_for=(OSError,), retry_backoff=True, max_retries=5)  # type: ignore[untyped-decorator]  # Celery is untyped
def record(key: str, text: str) -> str:
    """Store ``text`` under ``key``, once: ...so the write is keyed and idempotent."""
    statement = insert(Record).values(key=key, text=text)
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert  # noqa: PLC0415

        statement = pg_insert(Record).values(key=key, text=text).on_conflict_do_nothing()
    Session.execute(statement)
    return key  # committed by greenscope before SUCCESS is recorded
