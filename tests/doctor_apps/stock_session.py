"""SQLAlchemy's own scoped_session: shared by every greenlet if built before patching."""

from sqlalchemy import create_engine
from sqlalchemy.orm import scoped_session, sessionmaker

from doctor_apps._wsgi import hello

engine = create_engine("postgresql+psycopg://app@db.invalid/app", pool_size=100)
Session = scoped_session(sessionmaker(engine))
app = hello
