"""An in-memory SQLite database: under gevent each greenlet gets its own."""

from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from doctor_apps._wsgi import hello
from greenscope import scoped_session

engine = create_engine("sqlite://")
Session = scoped_session(sessionmaker(engine))
app = hello
