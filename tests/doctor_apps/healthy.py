"""Healthy: greenscope's scoped_session, psycopg 3, a pool for 100 connections."""

from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from doctor_apps._wsgi import hello
from greenscope import scoped_session

engine = create_engine(
    "postgresql+psycopg://app:secret@db.invalid/app", pool_size=20, max_overflow=80
)
Session = scoped_session(sessionmaker(engine))
app = hello


def create_app(greeting: str = "hello") -> object:
    """A factory, as in ``--app doctor_apps.healthy:create_app('hi')``."""
    return hello
