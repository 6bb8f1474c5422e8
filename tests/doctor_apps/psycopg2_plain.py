"""psycopg2 without a wait callback: every query blocks the worker."""

from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from doctor_apps._wsgi import hello
from greenscope import scoped_session

engine = create_engine("postgresql+psycopg2://app@db.invalid/app", pool_size=100)
Session = scoped_session(sessionmaker(engine))
app = hello
