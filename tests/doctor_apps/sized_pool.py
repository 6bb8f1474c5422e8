"""An engine sized by the environment: DOCTOR_DB_URL, POOL_SIZE and MAX_OVERFLOW.

For the max-connections check, which with ``--connect`` asks the database at that URL.
"""

import os

from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from doctor_apps._wsgi import hello
from greenscope import scoped_session

engine = create_engine(
    os.environ.get("DOCTOR_DB_URL", "postgresql+psycopg://app@db.invalid/app"),
    pool_size=int(os.environ.get("POOL_SIZE", "50")),
    max_overflow=int(os.environ.get("MAX_OVERFLOW", "0")),
)
Session = scoped_session(sessionmaker(engine))
app = hello
