"""A Celery app with a greenscope registry; install() and soft_time_limit by environment."""

import os

from celery import Celery
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

import greenscope
import greenscope.celery

app = Celery("doctor_celery", broker="memory://")
engine = create_engine(
    "postgresql+psycopg://app@db.invalid/app", pool_size=int(os.environ.get("POOL", "10"))
)
Session = greenscope.scoped_session(sessionmaker(engine))
if os.environ.get("INSTALL") == "1":
    greenscope.celery.install(app)


@app.task(soft_time_limit=5 if os.environ.get("SOFT") == "1" else None)  # type: ignore[untyped-decorator]  # Celery is untyped
def work() -> None:
    """A task."""
