"""psycopg2 made cooperative with psycogreen."""

import psycogreen.gevent  # type: ignore[import-untyped]  # psycogreen ships no types
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from doctor_apps._wsgi import hello
from greenscope import scoped_session

psycogreen.gevent.patch_psycopg()
engine = create_engine("postgresql+psycopg2://app@db.invalid/app", pool_size=100)
Session = scoped_session(sessionmaker(engine))
app = hello
