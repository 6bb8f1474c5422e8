"""A file SQLite database (never created: nothing connects)."""

import os

from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from doctor_apps._wsgi import hello
from greenscope import scoped_session

# DOCTOR_SQLITE_TIMEOUT: sqlite3's busy timeout through connect_args (default: 5 s).
connect_args = {}
if "DOCTOR_SQLITE_TIMEOUT" in os.environ:
    connect_args["timeout"] = float(os.environ["DOCTOR_SQLITE_TIMEOUT"])
engine = create_engine(
    "sqlite:///doctor-never-created.db", pool_size=100, connect_args=connect_args
)
Session = scoped_session(sessionmaker(engine))
app = hello
